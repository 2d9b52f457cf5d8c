"""CounterFact: loading (ROME and EasyEdit formats), downloading, selection, and the demo set.

CounterFact (Meng et al., NeurIPS 2022) comes in two shapes, detected per file:

- the original ROME file (``counterfact.json``): ``requested_rewrite`` with a ``{}`` prompt template,
  ``target_new.str`` / ``target_true.str``, two ``paraphrase_prompts``, ten ``neighborhood_prompts``
  and ``generation_prompts``;
- the EasyEdit split (``counterfact-edit.json`` ...): the subject written into ``prompt``, one
  ``rephrase_prompt`` and one ``locality_prompt`` with its ``locality_ground_truth``.

Both become one typed :class:`Record`. Every record is validated when loaded, before any model work,
and an error names the case id and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editors.requests import EditRequest
from editors.store import atomic_write, write_text_atomic

if TYPE_CHECKING:
    from .config import DatasetConfig

log = logging.getLogger(__name__)

#: The ROME authors' copy of CounterFact (21,919 records, ~45 MB): the cluster configs' default.
ROME_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
#: The project's own demo set: 30 counterfactual records about facts SmolLM2-135M gets right.
DEMO = Path(__file__).parent / "data" / "demo_counterfact.json"


class DatasetError(ValueError):
    """A dataset record or selection is invalid; the message names the case id and the field."""


@dataclass(frozen=True)
class Record:
    """One CounterFact case.

    Attributes:
        prompt: the rewrite prompt with ``{}`` for the subject.
        neighborhood_prompts: prompts about other subjects whose answer is ``neighborhood_answer``
            (the record's true object in CounterFact); NS asks that it still beats ``target_new``.
        generation_prompts: prompts for the generation-entropy test (ROME format only).
    """

    case_id: int
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_answer: str
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true, self.case_id)


def _field(rec: dict[str, Any], path: str, cid: Any) -> Any:
    node: Any = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DatasetError(f"case {cid}: missing field {path!r}")
        node = node[part]
    return node


def _text(value: Any, path: str, cid: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"case {cid}: field {path!r} must be a non-empty string, got {value!r}")
    return value


def _prompts(value: Any, path: str, cid: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DatasetError(f"case {cid}: field {path!r} must be a list of prompts")
    return tuple(_text(v, path, cid) for v in value)


def parse_record(rec: dict[str, Any]) -> Record:
    """One record of either format -> :class:`Record` (validated)."""
    cid = rec.get("case_id", "?")
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise DatasetError(f"case {cid}: field 'case_id' must be an integer")
    if "requested_rewrite" in rec:  # ROME format
        prompt = _text(_field(rec, "requested_rewrite.prompt", cid), "requested_rewrite.prompt", cid)
        subject = _text(_field(rec, "requested_rewrite.subject", cid), "requested_rewrite.subject", cid)
        new = _text(_field(rec, "requested_rewrite.target_new.str", cid), "target_new.str", cid)
        true = _text(_field(rec, "requested_rewrite.target_true.str", cid), "target_true.str", cid)
        if "{}" not in prompt:
            raise DatasetError(f"case {cid}: requested_rewrite.prompt has no '{{}}' for the subject: {prompt!r}")
        return Record(
            case_id=cid,
            prompt=prompt,
            subject=subject,
            target_new=new.strip(),
            target_true=true.strip(),
            paraphrase_prompts=_prompts(_field(rec, "paraphrase_prompts", cid), "paraphrase_prompts", cid),
            neighborhood_prompts=_prompts(_field(rec, "neighborhood_prompts", cid), "neighborhood_prompts", cid),
            neighborhood_answer=true.strip(),
            generation_prompts=_prompts(rec.get("generation_prompts", []), "generation_prompts", cid),
            relation_id=rec["requested_rewrite"].get("relation_id"),
        )
    # EasyEdit format
    prompt = _text(_field(rec, "prompt", cid), "prompt", cid)
    subject = _text(_field(rec, "subject", cid), "subject", cid)
    new = _text(_field(rec, "target_new", cid), "target_new", cid)
    true = _text(_field(rec, "ground_truth", cid), "ground_truth", cid)
    if "{}" not in prompt:
        i = prompt.find(subject)
        if i < 0:
            raise DatasetError(f"case {cid}: subject {subject!r} not found in prompt {prompt!r}")
        prompt = prompt[:i] + "{}" + prompt[i + len(subject) :]
    loc_answer = rec.get("locality_ground_truth", true)
    return Record(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=new.strip(),
        target_true=true.strip(),
        paraphrase_prompts=_prompts(_field(rec, "rephrase_prompt", cid), "rephrase_prompt", cid),
        neighborhood_prompts=_prompts(_field(rec, "locality_prompt", cid), "locality_prompt", cid),
        neighborhood_answer=_text(loc_answer, "locality_ground_truth", cid).strip(),
    )


def parse_records(data: Any, source: str = "dataset") -> list[Record]:
    """A JSON list of records (either format) -> records; duplicate case ids are an error."""
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{source}: expected a non-empty JSON list of CounterFact records")
    records = [parse_record(r) if isinstance(r, dict) else _bad(r, source) for r in data]
    seen: set[int] = set()
    for r in records:
        if r.case_id in seen:
            raise DatasetError(f"case {r.case_id}: duplicate case_id in {source}")
        seen.add(r.case_id)
    return records


def _bad(r: Any, source: str) -> Record:
    raise DatasetError(f"{source}: every record must be a JSON object, got {type(r).__name__}")


# ----------------------------------------------------------------------------------------------------
# Sources: a local path, a URL (downloaded once into a cache), or "demo"


def cache_dir() -> Path:
    """``$MODEL_EDITING_CACHE`` or ``~/.cache/model-editing-sweep``."""
    return Path(os.environ.get("MODEL_EDITING_CACHE", Path.home() / ".cache" / "model-editing-sweep"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, sha256: str | None = None, cache: Path | None = None) -> Path:
    """Download ``url`` once into the cache (temp file + rename) and return the local path.

    The file's sha256 is checked against ``sha256`` when given; otherwise the first download records
    it beside the file and later loads verify the file against that record.
    """
    cache = cache or cache_dir() / "datasets"
    path = cache / Path(url.split("?")[0]).name
    record = path.with_suffix(path.suffix + ".sha256")
    if path.is_file():
        digest = sha256_file(path)
        want = sha256 or (record.read_text().strip() if record.is_file() else digest)
        if digest != want:
            raise DatasetError(f"dataset.sha256: {path} has sha256 {digest}, expected {want}; delete it to refetch")
        return path
    log.info("downloading %s -> %s", url, path)

    def download(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
        except OSError as e:
            raise DatasetError(
                f"dataset.source: could not download {url} ({e}); offline? Put the file at {path} "
                "or set dataset.source to a local copy"
            ) from None
        digest = sha256_file(tmp)
        if sha256 and digest != sha256:
            raise DatasetError(f"dataset.sha256: download of {url} has sha256 {digest}, expected {sha256}")

    atomic_write(path, download)
    write_text_atomic(record, sha256_file(path) + "\n")
    return path


def resolve_source(source: str, sha256: str | None = None) -> Path:
    """``"demo"``, a URL, or a local path -> a local file."""
    if source == "demo":
        return DEMO
    if source.startswith(("http://", "https://")):
        return fetch(source, sha256)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DatasetError(f"dataset.source: {source!r} is not a file (give a path, a URL, or 'demo')")
    return path


def load_counterfact(source: str = "demo", sha256: str | None = None) -> list[Record]:
    """All records of a CounterFact file (ROME or EasyEdit format, detected per record)."""
    path = resolve_source(source, sha256)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset.source: {path} is not valid JSON ({e})") from None
    return parse_records(data, str(path))


# ----------------------------------------------------------------------------------------------------
# Selection


def load_selection(dataset: DatasetConfig, n: int | None) -> list[Record]:
    """The records a trial with ``dataset`` settings and ``n`` edits uses, in their fixed order."""
    d = dataset
    return select(
        load_counterfact(d.source, d.sha256),
        n=n,
        case_ids=d.case_ids,
        sample_file=d.sample_file,
        sample=d.sample,
        unique_subjects_seed=d.unique_subjects_seed,
    )


def select(
    records: Sequence[Record],
    *,
    n: int | None = None,
    case_ids: Sequence[int] | None = None,
    sample_file: str | None = None,
    sample: int = 0,
    unique_subjects_seed: int | None = None,
) -> list[Record]:
    """Choose the records a trial edits, in a fixed order.

    - ``case_ids``: exactly these, in this order;
    - ``sample_file`` (``counterfact_sampled_unique_cf_10_20000.json`` format: ``{"0": [ids...], ...}``):
      the ids of sample ``sample``, in order — the paper edits the first 4,096 of sample 0;
    - ``unique_subjects_seed``: shuffle with this seed and keep the first record of each subject;
    - otherwise the file order. Then the first ``n``.
    """
    by_id = {r.case_id: r for r in records}
    if case_ids is not None and sample_file is not None:
        raise DatasetError("dataset.case_ids: give case_ids or sample_file, not both")
    if sample_file is not None:
        if sample_file.startswith(("http://", "https://")):
            sample_file = str(fetch(sample_file))
        try:
            samples = json.loads(Path(sample_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"dataset.sample_file: cannot read {sample_file} ({e})") from None
        if str(sample) not in samples:
            raise DatasetError(f"dataset.sample: {sample} not in {sample_file} (has {sorted(samples)[:10]})")
        ids = samples[str(sample)]
        # The sample files cover all of CounterFact; keep the ids this file has (EasyEdit splits hold a part).
        ids = [i for i in ids if i in by_id] if case_ids is None else ids
        case_ids = ids
    if case_ids is not None:
        missing = [i for i in case_ids if i not in by_id]
        if missing:
            raise DatasetError(f"dataset.case_ids: {len(missing)} ids not in the dataset, e.g. {missing[:5]}")
        chosen = [by_id[i] for i in case_ids]
    elif unique_subjects_seed is not None:
        order = list(records)
        random.Random(unique_subjects_seed).shuffle(order)
        seen: set[str] = set()
        chosen = []
        for r in order:
            if r.subject not in seen:
                seen.add(r.subject)
                chosen.append(r)
    else:
        chosen = list(records)
    if n is not None:
        if n < 1:
            raise DatasetError(f"n_edits: must be >= 1, got {n}")
        if n > len(chosen):
            raise DatasetError(f"n_edits: {n} requested but the selection has only {len(chosen)} records")
        chosen = chosen[:n]
    return chosen
