"""Second-moment statistics (editors/stats.py) and their corpus (editors/corpus.py)."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from editors.corpus import CorpusSpec, corpus_identity, iter_texts, parse_hf_source
from editors.model import spec_for
from editors.stats import (
    MomentSums,
    SecondMoment,
    StatsKey,
    StatsStore,
    StreamSlice,
    add_sums,
    check_stats,
    collect_second_moments,
    get_or_compute,
    second_moment_sums,
    split_stream,
)
from tests.conftest import WIKI, corpus_text

MAX_TEXTS = 24


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """A few dozen Wikipedia paragraphs (a few thousand tokens)."""
    paras = [p.strip() for p in corpus_text(60_000).split("\n\n") if len(p.strip()) > 40]
    return paras[:MAX_TEXTS]


def reference_mom2(model, tok, spec, layer: int, texts: list[str], max_seq_len: int) -> torch.Tensor:
    """F.T @ F / N in float64 from a plain pre-hook on the rewrite module, one full forward per text."""
    feats = []
    module = model.get_submodule(spec.rewrite_name(layer))
    handle = module.register_forward_pre_hook(lambda m, args: feats.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, truncation=True, max_length=max_seq_len, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
    finally:
        handle.remove()
    f = torch.cat(feats).double()
    return f.T @ f / f.shape[0]


def collect(model, tok, layers, texts, **kw):
    kw.setdefault("progress", False)
    return collect_second_moments(model, tok, spec_for(model), layers, texts, **kw)


def test_one_pass_matches_per_layer_and_reference(model, tok, texts):
    spec = spec_for(model)
    both = collect(model, tok, [2, 0], texts, dtype=torch.float64)
    assert sorted(both) == [0, 2]
    for layer in (0, 2):
        alone = collect(model, tok, [layer], texts, dtype=torch.float64)[layer]
        assert both[layer].n_tokens == alone.n_tokens
        torch.testing.assert_close(both[layer].mom2, alone.mom2, rtol=1e-10, atol=1e-12)
        ref = reference_mom2(model, tok, spec, layer, texts, max_seq_len=256)
        assert both[layer].mom2.shape == (spec.d_key, spec.d_key)
        assert both[layer].mom2.dtype == torch.float64
        torch.testing.assert_close(both[layer].mom2, ref, rtol=1e-5, atol=1e-7)
    n_ref = sum(len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    assert both[0].n_tokens == n_ref
    assert not torch.allclose(both[0].mom2, both[2].mom2)


def test_layers_above_the_deepest_are_not_run(model, tok, texts):
    calls = [0] * 4
    handles = [
        block.register_forward_pre_hook(lambda m, a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        collect(model, tok, [0, 1], texts[:6])
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == calls[1] > 0
    assert calls[2] == calls[3] == 0
    assert model.model.layers[1].mlp.down_proj._forward_pre_hooks == {}  # hooks removed


def test_padding_is_excluded(model, tok, texts):
    small = collect(model, tok, [1], texts, batch_tokens=64)[1]  # many short, padded batches
    large = collect(model, tok, [1], texts, batch_tokens=1 << 20)[1]  # one batch, lots of padding
    assert small.n_tokens == large.n_tokens
    torch.testing.assert_close(small.mom2, large.mom2, rtol=1e-5, atol=1e-7)


def test_default_batch_tokens_by_device(model, tok, texts):
    from editors.stats import default_batch_tokens

    assert default_batch_tokens("cpu") == 1024 and default_batch_tokens(torch.device("cuda", 0)) == 8192
    default = collect(model, tok, [1], texts)[1]  # the tiny model is on the CPU: 1,024 tokens per pass
    explicit = collect(model, tok, [1], texts, batch_tokens=1024)[1]
    assert default.n_tokens == explicit.n_tokens
    torch.testing.assert_close(default.mom2, explicit.mom2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch_tokens"):
        collect(model, tok, [1], texts, batch_tokens=0)


def test_max_tokens_is_exact_and_max_texts_caps(model, tok, texts):
    capped = collect(model, tok, [0], texts, max_tokens=777)[0]
    assert capped.n_tokens == 777
    few = collect(model, tok, [0], texts, max_texts=3, max_seq_len=16)[0]
    assert few.n_tokens == sum(len(tok(t)["input_ids"][:16]) for t in texts[:3])
    # the cap keeps the first tokens of the stream: the reference over the cut texts agrees
    spec = spec_for(model)
    ids = [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    cut, left = [], 777
    for seq in ids:
        cut.append(seq[:left])
        left -= len(cut[-1])
        if left == 0:
            break
    ref_texts = [tok.decode(c) for c in cut]
    assert [tok(t)["input_ids"] for t in ref_texts] == cut  # byte-level BPE round trip
    ref = reference_mom2(model, tok, spec, 0, ref_texts, max_seq_len=256)
    torch.testing.assert_close(capped.mom2.double(), ref, rtol=1e-4, atol=1e-6)


def _summed(model, tok, layers, texts, parts, **kw):
    """Each part's partial sums, added per layer and divided: {layer: SecondMoment}."""
    got = [second_moment_sums(model, tok, spec_for(model), layers, texts, part=p, progress=False, **kw) for p in parts]
    return {layer: add_sums(g[layer] for g in got).moment() for layer in layers}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partial_sums_over_a_split_stream_equal_one_pass_with_a_cut_inside_a_text(model, tok, texts, dtype):
    """max_tokens = 1,234 ends inside a text, and the boundaries of a 3-way split fall inside texts
    too: the parts hold exactly the keys of the single pass, so their sums give its C."""
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"]]
    ends = set(itertools.accumulate(lengths))
    parts = split_stream(3, max_tokens=1234)
    assert [(p.start, p.stop) for p in parts] == [(0, 411), (411, 822), (822, 1234)]
    assert not ends & {411, 822, 1234}, "each boundary and the cut fall inside a text"
    one = collect(model, tok, [0, 2], texts, max_tokens=1234, max_seq_len=256, dtype=dtype)
    split = _summed(model, tok, [0, 2], texts, parts, max_tokens=1234, max_seq_len=256, dtype=dtype)
    for layer in (0, 2):
        assert split[layer].n_tokens == one[layer].n_tokens == 1234
        assert split[layer].mom2.dtype == dtype
        torch.testing.assert_close(split[layer].mom2, one[layer].mom2, rtol=1e-5, atol=1e-6)
    # each part counts exactly its own keys
    sizes = [second_moment_sums(model, tok, spec_for(model), [0], texts, part=p, max_tokens=1234,
                                max_seq_len=256, progress=False)[0].n_tokens for p in parts]  # fmt: skip
    assert sizes == [411, 411, 412]


def test_partial_sums_split_by_texts_without_a_token_cap_equal_one_pass(model, tok, texts):
    """Without max_tokens a pass splits by texts (max_texts of them); a part past the corpus's end
    sums nothing, and the total still equals the single pass."""
    parts = split_stream(4, max_texts=10)
    assert [(p.first_text, p.stop_text) for p in parts] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    one = collect(model, tok, [1], texts, max_texts=10, max_seq_len=64)[1]
    split = _summed(model, tok, [1], texts, parts, max_texts=10, max_seq_len=64)[1]
    assert split.n_tokens == one.n_tokens == sum(len(tok(t)["input_ids"][:64]) for t in texts[:10])
    torch.testing.assert_close(split.mom2, one.mom2, rtol=1e-5, atol=1e-6)
    past = second_moment_sums(model, tok, spec_for(model), [1], texts[:3], part=parts[-1], progress=False)[1]
    assert past.n_tokens == 0 and not past.sums.any()
    # a corpus shorter than max_tokens: the later token parts are empty, the sum is the whole corpus
    short = texts[:2]
    whole = collect(model, tok, [1], short, max_tokens=50_000)[1]
    got = _summed(model, tok, [1], short, split_stream(3, max_tokens=50_000), max_tokens=50_000)[1]
    assert got.n_tokens == whole.n_tokens < 50_000
    torch.testing.assert_close(got.mom2, whole.mom2, rtol=1e-5, atol=1e-6)


def test_split_stream_and_sums_validate_their_arguments():
    assert split_stream(1, max_tokens=100) == [StreamSlice()]
    assert split_stream(8) == [StreamSlice()]  # an uncapped stream's length is unknown: not split
    assert len(split_stream(8, max_tokens=3)) == 3  # never more parts than tokens
    with pytest.raises(ValueError, match="n:"):
        split_stream(0, max_tokens=10)
    with pytest.raises(ValueError, match="start"):
        StreamSlice(start=5, stop=4)
    with pytest.raises(ValueError, match="parts"):
        add_sums([])
    with pytest.raises(ValueError, match="parts"):
        add_sums([MomentSums(torch.zeros(2, 2), 1), MomentSums(torch.zeros(3, 3), 1)])
    with pytest.raises(ValueError, match="corpus"):
        MomentSums(torch.zeros(2, 2), 0).moment()
    view = torch.ones(2, 2)
    total = add_sums([MomentSums(view, 3), MomentSums(torch.ones(2, 2), 5)])
    assert total.n_tokens == 8 and torch.equal(view, torch.ones(2, 2))  # the first part is not written to


def test_model_is_bit_identical(model, tok, texts):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    collect(model, tok, [0, 3], texts[:8])
    assert model.training and model.model.layers[0].training  # flags restored
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bos_tokenizer(tok_bos, texts):
    from tests.conftest import make_model

    model = make_model(len(tok_bos))
    got = collect(model, tok_bos, [1], texts[:8], dtype=torch.float64)[1]
    n_ref = sum(len(tok_bos(t, truncation=True, max_length=256)["input_ids"]) for t in texts[:8])
    assert got.n_tokens == n_ref  # BOS keys counted
    ref = reference_mom2(model, tok_bos, spec_for(model), 1, texts[:8], max_seq_len=256)
    torch.testing.assert_close(got.mom2, ref, rtol=1e-5, atol=1e-7)


def test_float64_close_to_float32(model, tok, texts):
    f32 = collect(model, tok, [2], texts, dtype="float32")[2]
    f64 = collect(model, tok, [2], texts, dtype=torch.float64)[2]
    assert f32.mom2.dtype == torch.float32 and f64.mom2.dtype == torch.float64
    torch.testing.assert_close(f32.mom2.double(), f64.mom2, rtol=1e-4, atol=1e-6)


def test_argument_validation(model, tok, texts):
    with pytest.raises(ValueError, match="dtype"):
        collect(model, tok, [0], texts, dtype=torch.float16)
    with pytest.raises(ValueError, match="layers"):
        collect(model, tok, [], texts)
    with pytest.raises(ValueError, match="layers"):
        collect(model, tok, [4], texts)
    with pytest.raises(ValueError, match="max_tokens"):
        collect(model, tok, [0], texts, max_tokens=0)
    with pytest.raises(ValueError, match="corpus"):
        collect(model, tok, [0], ["", ""])


# ----------------------------------------------------------------------------------------------------
# Corpus


@pytest.mark.skipif(not WIKI.is_file(), reason="../shared/data is missing")
def test_iter_texts_wiki_docs():
    docs = list(iter_texts(CorpusSpec(str(WIKI))))
    assert len(docs) == 2349
    assert all(d and d == d.strip() and "<doc" not in d and "</doc>" not in d for d in docs)
    assert docs[0].startswith("2007 European Parliament election in Romania")
    assert len(list(iter_texts(CorpusSpec(str(WIKI), max_texts=5)))) == 5


def test_iter_texts_plain_and_folder(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\n  second para  \n\nthird\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.utf8").write_text('<doc id="1" title="x">\nDoc one\n</doc>\n', encoding="utf-8")
    (tmp_path / "ignored.json").write_text("{}", encoding="utf-8")
    assert list(iter_texts(CorpusSpec(str(tmp_path / "a.txt")))) == [
        "first para\nline two",
        "second para",
        "third",
    ]
    assert list(iter_texts(CorpusSpec(str(tmp_path)))) == [
        "first para\nline two",
        "second para",
        "third",
        "Doc one",
    ]
    shuffled = list(iter_texts(CorpusSpec(str(tmp_path), shuffle_seed=0)))
    assert sorted(shuffled) == sorted(iter_texts(CorpusSpec(str(tmp_path))))

    ident = corpus_identity(CorpusSpec(str(tmp_path)))
    assert ident == corpus_identity(CorpusSpec(str(tmp_path), max_texts=2))
    (tmp_path / "a.txt").write_text("changed\n", encoding="utf-8")
    assert corpus_identity(CorpusSpec(str(tmp_path))) != ident
    assert corpus_identity(CorpusSpec(str(tmp_path / "a.txt"))).startswith("file:")


def test_missing_corpus_names_the_field(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"corpus\.source"):
        list(iter_texts(CorpusSpec(str(tmp_path / "nope.txt"))))
    with pytest.raises(FileNotFoundError, match=r"corpus\.source"):
        corpus_identity(CorpusSpec(str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"corpus\.source"):
        list(iter_texts(CorpusSpec(str(tmp_path))))  # empty folder
    with pytest.raises(ValueError, match=r"corpus\.source"):
        CorpusSpec("hf:")


def test_hf_source_parsing_and_identity():
    assert parse_hf_source("hf:wikimedia/wikipedia:20231101.en:train") == (
        "wikimedia/wikipedia",
        "20231101.en",
        "train",
    )
    assert parse_hf_source("hf:ds") == ("ds", None, "train")
    assert parse_hf_source("hf:ds::validation") == ("ds", None, "validation")
    a = corpus_identity(CorpusSpec("hf:wikimedia/wikipedia:20231101.en:train"))
    assert a.startswith("hf:wikimedia/wikipedia:20231101.en:train")
    assert a != corpus_identity(CorpusSpec("hf:wikimedia/wikipedia:20231101.en:train", revision="abc"))
    assert a != corpus_identity(CorpusSpec("hf:wikimedia/wikipedia:20231101.en:train", shuffle_seed=1))


# ----------------------------------------------------------------------------------------------------
# Cache


def make_key(**kw) -> StatsKey:
    base = dict(model="dir:tiny:0123", layer=1, corpus="file:abcd", max_texts=None, max_tokens=5000)
    base.update(max_seq_len=256, dtype="float32")
    base.update(kw)
    return StatsKey(**base)


def test_stats_key_digest():
    k = make_key()
    assert len(k.digest()) == 24 and k.digest() == make_key().digest()
    assert make_key(dtype=torch.float32) == k
    assert json.loads(k.to_json())["max_tokens"] == 5000
    for other in (
        make_key(max_tokens=5001),
        make_key(dtype="float64"),
        make_key(layer=2),
        make_key(module="x"),
    ):
        assert other.digest() != k.digest()
    with pytest.raises(ValueError, match="dtype"):
        make_key(dtype="float16")


def test_store_round_trip_and_misses(tmp_path: Path):
    store = StatsStore(tmp_path / "stats")
    key = make_key()
    m = torch.randn(48, 48)
    sm = SecondMoment(m @ m.T, 1234)
    assert store.get(key) is None and key not in store
    path = store.put(key, sm)
    assert path == store.path(key) and path.suffix == ".safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert path.read_bytes()[:2] != b"\x80\x02"  # not a pickle; safetensors header length comes first
    got = store.get(key)
    assert key in store
    assert got is not None and got.n_tokens == 1234
    assert got.mom2.dtype == torch.float32 and torch.equal(got.mom2, sm.mom2)
    for other in (make_key(max_tokens=999), make_key(dtype="float64"), make_key(layer=2)):
        assert store.get(other) is None and other not in store
    with pytest.raises(ValueError, match="dtype"):
        store.put(make_key(dtype="float64"), sm)


def test_store_mismatched_or_corrupt_file_is_a_miss(tmp_path: Path, caplog):
    store = StatsStore(tmp_path)
    key, other = make_key(), make_key(layer=3)
    # a file at key's path that records another key (a collision / stale file)
    store.root.mkdir(exist_ok=True)
    save_file(
        {"mom2": torch.eye(48)},
        str(store.path(key)),
        metadata={"format": "editors.stats.v1", "key": other.to_json(), "n_tokens": "10"},
    )
    with caplog.at_level(logging.WARNING, logger="editors.stats"):
        assert store.get(key) is None
    assert "another key" in caplog.text
    assert key not in store
    store.path(key).write_bytes(b"not a safetensors file at all")
    assert store.get(key) is None and key not in store
    store.put(key, SecondMoment(torch.eye(48), 10))  # overwrites the corrupt file
    assert store.get(key) is not None


def test_get_or_compute_computes_missing_layers_once(tmp_path: Path, model, tok, texts):
    store = StatsStore(tmp_path)
    keys = {layer: make_key(layer=layer, max_tokens=500) for layer in (0, 1, 3)}
    calls: list[list[int]] = []

    def compute(layers: list[int]) -> dict[int, SecondMoment]:
        calls.append(layers)
        return collect(model, tok, layers, texts, max_tokens=500)

    store.put(keys[1], collect(model, tok, [1], texts, max_tokens=500)[1])
    first = get_or_compute(store, keys, compute)
    assert calls == [[0, 3]]
    assert list(first) == [0, 1, 3] and all(first[layer].n_tokens == 500 for layer in first)
    second = get_or_compute(store, keys, compute)
    assert calls == [[0, 3]]  # all cached now
    for layer in keys:
        assert torch.equal(second[layer].mom2, first[layer].mom2.cpu())


def test_check_stats(model):
    spec = spec_for(model)
    ok = torch.eye(spec.d_key)
    assert check_stats(SecondMoment(ok, 1), spec, 1) is ok
    with pytest.raises(ValueError, match=r"^cov: stats for layer 1 are 11x11 but the layer's keys are 48-wide"):
        check_stats(torch.eye(11), spec, 1, field="cov")
    with pytest.raises(ValueError, match=r"mom2.*square"):
        check_stats(torch.zeros(48, 47), spec, 0, field="mom2")
    bad = ok.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"stats.*NaN"):
        check_stats(bad, spec, 0)


# ----------------------------------------------------------------------------------------------------
# Tokens per text and the sample of texts, as the reference code draws them (docs/ALGORITHMS.md §1)


def test_max_seq_len_cuts_each_text_and_defaults_to_the_context(model, tok, texts):
    from editors.stats import FALLBACK_MAX_SEQ_LEN, default_max_seq_len

    lens = [len(ids) for ids in tok(texts)["input_ids"]]
    assert max(lens) > 256  # the tiny model's context is 256: both cuts bite
    cut = collect(model, tok, [1], texts, max_seq_len=40)[1]
    assert cut.n_tokens == sum(min(n, 40) for n in lens) < sum(min(n, 256) for n in lens)
    default = collect(model, tok, [1], texts)[1]
    assert default_max_seq_len(model) == 256
    assert default.n_tokens == sum(min(n, 256) for n in lens) != sum(lens)
    assert not torch.allclose(cut.mom2, default.mom2)
    with pytest.raises(ValueError, match="max_seq_len"):
        collect(model, tok, [1], texts, max_seq_len=257)  # beyond the model's positions
    assert default_max_seq_len(torch.nn.Linear(2, 2)) == FALLBACK_MAX_SEQ_LEN  # no position limit declared


def test_a_long_context_is_not_cut_at_2048(model, tok, texts):
    """The statistics used to cut every text at 2,048 tokens whatever the model; the reference cuts at
    the model's context. One text of over 2,048 tokens, longer than a whole token batch."""
    parts: list[str] = []
    while len(tok("\n\n".join(parts))["input_ids"]) < 2400:
        parts.append(texts[len(parts)])
    long_text = "\n\n".join(parts)
    n = len(tok(long_text)["input_ids"])
    assert 2400 <= n < 4096
    model.config.max_position_embeddings = 4096  # RoPE has no position table: a longer context
    got = collect(model, tok, [0], [long_text, texts[0]], batch_tokens=512)[0]
    assert got.n_tokens == n + len(tok(texts[0])["input_ids"])
    two_k = collect(model, tok, [0], [long_text, texts[0]], batch_tokens=512, max_seq_len=2048)[0]
    assert two_k.n_tokens == 2048 + len(tok(texts[0])["input_ids"])


def _reference_sample(n: int, sample_size: int, seed: int) -> list[int]:
    """util/runningstats.py of ROME/MEMIT/unified-model-editing, FixedRandomSubsetSampler(data_source,
    seed=random_sample, end=sample_size).samples, copied by hand."""
    import random

    rng = random.Random(seed)
    shuffled = list(range(n))
    rng.shuffle(shuffled)
    return shuffled[None:sample_size]


def _numbered_corpus(path: Path, n: int = 60) -> list[str]:
    words = corpus_text(20_000).split()
    paras = [f"{i}: " + " ".join(words[i * 37 : i * 37 + 12]) for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return paras


def test_sample_seed_draws_the_references_texts(tmp_path: Path):
    paras = _numbered_corpus(tmp_path / "c.txt")
    src = str(tmp_path / "c.txt")
    one = list(iter_texts(CorpusSpec(src, max_texts=10, sample_seed=1)))
    assert one == [paras[i] for i in _reference_sample(len(paras), 10, 1)]
    assert one == list(iter_texts(CorpusSpec(src, max_texts=10, sample_seed=1)))  # deterministic
    assert one != paras[:10] and len(set(one)) == 10
    two = list(iter_texts(CorpusSpec(src, max_texts=10, sample_seed=2)))
    assert two == [paras[i] for i in _reference_sample(len(paras), 10, 2)] and set(two) != set(one)
    everything = list(iter_texts(CorpusSpec(src, sample_seed=1)))  # no cap: the whole corpus, drawn order
    assert everything[:10] == one and sorted(everything) == sorted(paras)
    idents = {corpus_identity(CorpusSpec(src, sample_seed=s)) for s in (None, 1, 2)}
    assert len(idents) == 3
    with pytest.raises(ValueError, match=r"corpus\.sample_seed"):
        CorpusSpec(src, sample_seed=1, shuffle_seed=1)
    with pytest.raises(ValueError, match=r"corpus\.sample_seed"):
        CorpusSpec(src, sample_seed=-1)


def test_sample_seed_on_hf_draws_rows_of_the_whole_dataset(monkeypatch):
    import sys
    import types

    rows = [{"text": f"article {i}" if i % 3 else "  "} for i in range(40)]  # a third of the rows are empty
    calls = []

    class Rows(list):
        def select(self, indices):
            return Rows(self[i] for i in indices)

    def load_dataset(name, config, **kw):
        calls.append((name, config, kw))
        return Rows(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    got = list(iter_texts(CorpusSpec("hf:some/wiki:en", max_texts=12, sample_seed=1)))
    drawn = [rows[i]["text"] for i in _reference_sample(len(rows), 12, 1)]
    assert got == [t for t in drawn if t.strip()] and len(got) < 12  # the empty rows drawn are skipped
    assert calls == [("some/wiki", "en", {"split": "train", "streaming": False})]  # loaded whole


def test_stats_settings_reach_the_pass_and_the_key(tmp_path: Path, model, tok):
    from editors.config import ConfigError
    from sweep.config import parse_config
    from sweep.shared.compute import compute_stats
    from sweep.shared.keys import stats_keys

    paras = _numbered_corpus(tmp_path / "c.txt")

    def cfg(**stats):
        return parse_config({"stats": {"corpus": str(tmp_path / "c.txt"), "max_tokens": None, **stats}})

    got = compute_stats(cfg(max_texts=8, sample_seed=3, max_seq_len=9), model, tok, [0], progress=False)[0]
    lens = [len(tok(paras[i])["input_ids"]) for i in _reference_sample(len(paras), 8, 3)]
    assert max(lens) > 9 and got.n_tokens == sum(min(n, 9) for n in lens)
    first = compute_stats(cfg(max_texts=8, max_seq_len=9), model, tok, [0], progress=False)[0]
    assert first.n_tokens == sum(min(len(tok(p)["input_ids"]), 9) for p in paras[:8])
    assert not torch.allclose(first.mom2, got.mom2)

    def key(**stats):
        return stats_keys(cfg(max_texts=8, **stats), [0], "m")[0]

    assert key().max_seq_len == "context" and key(max_seq_len=9).max_seq_len == 9
    digests = {key(**s).digest() for s in ({}, {"max_seq_len": 9}, {"sample_seed": 1}, {"sample_seed": 2})}
    assert len(digests) == 4
    assert key(sample_seed=1).digest() == key(sample_seed=1).digest()
    for bad, field in (({"max_seq_len": 0}, "stats.max_seq_len"), ({"sample_seed": -1}, "stats.sample_seed")):
        with pytest.raises(ConfigError, match=field):
            cfg(**bad)
