"""Convert one of our cached second-moment files (editors/stats.py, ``<digest>.safetensors``) into the
``.npz`` that the reference's ``rome/layer_stats.py`` loads, so that the reference edits with the SAME C.

Run with the SYSTEM python, from the repository root:

    python3 bench/reference/stats_to_npz.py .cache/stats/<digest>.safetensors --out .ref/stats/layer2.npz

Formats:
- ours: tensor ``mom2`` = C = (1/N) sum_t k_t k_t^T (float32 or float64), metadata ``n_tokens`` = N and
  ``key`` (JSON: model, layer, corpus, ...).
- the reference (util/runningstats.py ``SecondMoment.state_dict`` saved by ``tally`` through
  ``CombinedStat``): ``mom2.mom2`` = the running SUM sum_t k_t k_t^T (in the ``mom2_dtype`` the stats
  were collected in), ``mom2.count`` = N, ``mom2.constructor``, and ``sample_size`` (the number of
  texts; ``tally`` only accepts the file when it equals the ``mom2_n_samples`` hparam;
  ``run_reference.py`` sets that hparam from the file). The reference's C is ``moment() = mom2 / count``.

So ``mom2.mom2`` = C * N, computed in float64 and stored in ``--dtype`` (default float32, the hparams'
``mom2_dtype``); ``moment()`` then equals our C up to one float32 rounding (checked here and again by the
runner on the matrix the reference actually loads). The file name the reference looks for is built by
the runner (a symlink); the name given here is free.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def convert(src: Path, out: Path, sample_size: int, dtype: str) -> dict:
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        mom2 = f.get_tensor("mom2")
    if "n_tokens" not in meta:
        raise SystemExit(f"{src}: no n_tokens in the metadata; not an editors.stats file")
    n = int(meta["n_tokens"])
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise SystemExit(f"{src}: mom2 is {tuple(mom2.shape)}, not square")
    c = mom2.to(torch.float64).numpy()
    total = (c * n).astype(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        **{
            "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
            "mom2.count": np.array(n),
            "mom2.mom2": total,
            "sample_size": np.array(sample_size),
            "source.file": np.array(str(src)),
            "source.key": np.array(meta.get("key", "")),
        },
    )
    # Verify: what the reference computes from the file (moment() = mom2 / count, in the file's dtype).
    with np.load(out) as d:
        moment = torch.from_numpy(d["mom2.mom2"]) / int(d["mom2.count"])
    diff = float((moment.double() - mom2.double()).abs().max())
    scale = float(mom2.double().abs().max())
    res = {
        "src": str(src),
        "out": str(out),
        "layer": json.loads(meta["key"]).get("layer") if meta.get("key") else None,
        "n_tokens": n,
        "shape": list(mom2.shape),
        "dtype": dtype,
        "sample_size": sample_size,
        "max_abs_diff": diff,
        "max_abs_value": scale,
        "bit_identical": bool(torch.equal(moment.to(mom2.dtype), mom2)),
    }
    if diff > 1e-6 * scale:
        raise SystemExit(f"conversion check failed: {res}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="an editors.stats .safetensors file")
    ap.add_argument("--out", required=True, help="the .npz to write")
    ap.add_argument(
        "--sample-size",
        type=int,
        default=100000,
        help="sample_size key (default 100000, the reference's mom2_n_samples)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    print(json.dumps(convert(Path(args.src), Path(args.out), args.sample_size, args.dtype), indent=1))


if __name__ == "__main__":
    main()
