"""Edit benchmarks: CounterFact, ZsRE and QAEdit — loading, downloading, selection, and the demo set.

CounterFact (Meng et al., NeurIPS 2022) comes in two shapes, detected per file:

- the original ROME file (``counterfact.json``): ``requested_rewrite`` with a ``{}`` prompt template,
  ``target_new.str`` / ``target_true.str``, two ``paraphrase_prompts``, ten ``neighborhood_prompts``
  and ``generation_prompts``;
- the EasyEdit split (``counterfact-edit.json`` ...): the subject written into ``prompt``, one
  ``rephrase_prompt`` and one ``locality_prompt`` with its ``locality_ground_truth``.

ZsRE (question answering; MEND's evaluation split) comes in two shapes, detected per record:

- the MEND format (``zsre_mend_eval.json``, EasyEdit's ZsRE files): ``src``,
  ``subject``, ``answers``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``; read as MEMIT's
  ``dsets/zsre.py`` reads it (see :func:`parse_zsre_mend`);
- the KnowEdit format (``ZsRE-test-all.json``): ``prompt``, ``target_new``, ``ground_truth`` (a list),
  ``rephrase_prompt``, ``locality.Relation_Specificity`` (see :func:`parse_zsre_knowedit`).

QAEdit (Yang et al., ACL 2025): ``prompt``, ``target``, ``subject``, ``rephrase``, ``locality`` (see
:func:`parse_qaedit`).

WikiBigEdit (Thede et al., ICML 2025, arXiv 2503.05683): real Wikidata updates as questions, one file per
timestep (:data:`WIKIBIGEDIT_URL`): ``update``, ``ans``, ``rephrase``, ``personas``, ``loc``, ``loc_ans``,
``mhop``, ``mhop_ans``, ``subject`` and Wikidata ids (see :func:`parse_wikibigedit`). UltraEditBench
(arXiv 2505.14679): ``prompt``, ``rephrase_prompt``, ``ans``, ``loc``, ``loc_ans``, ``subject``, as a JSON
list or JSON lines (see :func:`parse_ultraeditbench`).

All become one typed :class:`Record`. Every record is validated when loaded, before any model work,
and an error names the case and the field. ZsRE and QAEdit records have no case ids of their own: a
record's case id is its position in the file (as MEMIT's), which is what ZsRE sample lists index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from editors.store import atomic_write, write_text_atomic

from .records import BENCHMARKS, QA_BENCHMARKS, DatasetError, Record, SourceUnavailable, check_unique

if TYPE_CHECKING:
    from ..config import DatasetConfig

log = logging.getLogger(__name__)

#: The ROME authors' copy of CounterFact (21,919 records, ~45 MB): the cluster configs' default.
ROME_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
#: The ROME/MEMIT authors' copy of MEND's zsRE evaluation split (19,086 records, ~8 MB; ROME's and MEMIT's
#: ``dsets/zsre.py`` download ``<root>/data/dsets/zsre_mend_eval.json``): the cluster configs' default for
#: ZsRE. The ZsRE sample lists (``zsre_sampled_unique_10_10000.json``) index its positions.
ZSRE_URL = "https://rome.baulab.info/data/dsets/zsre_mend_eval.json"
#: WikiBigEdit's eight timesteps on the Hugging Face Hub (``lukasthede/WikiBigEdit``), e.g.
#: ``WIKIBIGEDIT_URL.format(span="20240201_20240220")`` for the first; pin the file with ``dataset.sha256``.
WIKIBIGEDIT_URL = "https://huggingface.co/datasets/lukasthede/WikiBigEdit/resolve/main/wiki_big_edit_{span}.json"
WIKIBIGEDIT_SPANS = (
    "20240201_20240220",
    "20240220_20240301",
    "20240301_20240320",
    "20240320_20240401",
    "20240401_20240501",
    "20240501_20240601",
    "20240601_20240620",
    "20240620_20240701",
)
#: ZsRE's edit target (``DatasetConfig.target``): the first gold answer, or MEND's alternative answer.
Target = Literal["answers", "alt"]
#: What a benchmark is called in messages.
_LABEL = {
    "counterfact": "CounterFact",
    "zsre": "ZsRE",
    "qaedit": "QAEdit",
    "mquake": "MQuAKE",
    "wikibigedit": "WikiBigEdit",
    "ultraeditbench": "UltraEditBench",
}
#: The project's own demo set: 30 counterfactual records about facts SmolLM2-135M gets right.
DEMO = Path(__file__).parent.parent / "data" / "demo_counterfact.json"


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
    check_unique([r.case_id for r in records], source)
    return records


def _bad(r: Any, source: str) -> Record:
    raise DatasetError(f"{source}: every record must be a JSON object, got {type(r).__name__}")


# ----------------------------------------------------------------------------------------------------
# ZsRE and QAEdit: question-answering records; the case id is the record's position in the file


def _answers(value: Any, path: str, cid: Any) -> tuple[str, ...]:
    """A non-empty list of answers (or one answer) -> stripped answers."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DatasetError(f"case {cid}: field {path!r} must be a non-empty list of answers, got {value!r}")
    return tuple(_text(v, path, cid).strip() for v in value)


def _template(text: str, subject: str, path: str, cid: Any) -> str:
    """``text`` with the first occurrence of ``subject`` replaced by ``{}``."""
    if "{}" in text:
        raise DatasetError(f"case {cid}: field {path!r} already holds '{{}}': {text!r}")
    i = text.find(subject)
    if i < 0:
        raise DatasetError(f"case {cid}: field 'subject' {subject!r} is not in field {path!r} {text!r}")
    return text[:i] + "{}" + text[i + len(subject) :]


def parse_zsre_mend(rec: dict[str, Any], cid: int, target: Target = "answers") -> Record | None:
    """One MEND-format ZsRE record (position ``cid`` in its file) -> :class:`Record`, as MEMIT's
    ``dsets/zsre.py`` builds it: prompt = ``src`` with the subject as ``{}``; target_new = ``answers[0]``
    (``target="answers"``: MEMIT/AlphaEdit; the other answers become ``target_aliases``) or ``alt``
    (``target="alt"``: EasyEdit; ``None`` when ``alt`` is empty, a record EasyEdit skips); target_true =
    ``answers[0]`` (the gold answer; MEMIT's request has the placeholder ``"<|endoftext|>"`` there);
    paraphrase = ``rephrase``; neighbourhood = MEMIT's ``loc + "?"`` answered by ``loc_ans``.
    Extra fields (``pred``, ``cond``, ``portability`` ...) are ignored."""
    subject = _text(_field(rec, "subject", cid), "subject", cid)
    prompt = _template(_text(_field(rec, "src", cid), "src", cid), subject, "src", cid)
    answers = _answers(_field(rec, "answers", cid), "answers", cid)
    loc = _text(_field(rec, "loc", cid), "loc", cid)
    if "nq question: " not in loc:  # MEMIT asserts it
        raise DatasetError(f"case {cid}: field 'loc' must hold 'nq question: ' (a Natural Questions question): {loc!r}")
    loc_ans = _text(_field(rec, "loc_ans", cid), "loc_ans", cid).strip()
    if target == "alt":
        alt = _field(rec, "alt", cid)
        if isinstance(alt, str) and not alt.strip():
            return None
        new, aliases = _text(alt, "alt", cid).strip(), ()
    else:
        new, aliases = answers[0], answers[1:]
    return Record(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=answers[0],
        paraphrase_prompts=(_text(_field(rec, "rephrase", cid), "rephrase", cid),),
        neighborhood_prompts=(loc + "?",),
        neighborhood_answer=loc_ans,
        dataset="zsre",
        target_aliases=aliases,
    )


def parse_zsre_knowedit(rec: dict[str, Any], cid: int, target: Target = "answers") -> Record:
    """One KnowEdit-format ZsRE record (``ZsRE-test-all.json``) -> :class:`Record`: target_new =
    ``ground_truth[0]`` (``target="answers"``; the others become ``target_aliases``) or ``target_new``
    (``target="alt"``, MEND's alt); target_true = ``ground_truth[0]``; paraphrase = ``rephrase_prompt``;
    neighbourhood = the ``locality.Relation_Specificity`` prompts, each answered by its first ground truth."""
    subject = _text(_field(rec, "subject", cid), "subject", cid)
    prompt = _template(_text(_field(rec, "prompt", cid), "prompt", cid), subject, "prompt", cid)
    truths = _answers(_field(rec, "ground_truth", cid), "ground_truth", cid)
    if target == "alt":
        new, aliases = _text(_field(rec, "target_new", cid), "target_new", cid).strip(), ()
    else:
        new, aliases = truths[0], truths[1:]
    path = "locality.Relation_Specificity"
    items = _field(rec, path, cid)
    if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items):
        raise DatasetError(f"case {cid}: field {path!r} must be a non-empty list of {{prompt, ground_truth}}")
    prompts = tuple(_text(x.get("prompt"), f"{path}[{j}].prompt", cid) for j, x in enumerate(items))
    answers = tuple(_answers(x.get("ground_truth"), f"{path}[{j}].ground_truth", cid)[0] for j, x in enumerate(items))
    return Record(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=truths[0],
        paraphrase_prompts=_prompts(_field(rec, "rephrase_prompt", cid), "rephrase_prompt", cid),
        neighborhood_prompts=prompts,
        neighborhood_answer=answers[0],
        dataset="zsre",
        neighborhood_answers=answers,
        target_aliases=aliases,
    )


def parse_qaedit(rec: dict[str, Any], cid: int) -> Record:
    """One QAEdit record -> :class:`Record`, as the WILD code (``edit.py --datatype qaedit``) reads it:
    target_new = target_true = ``target`` (the real answer; its text kept, whitespace stripped);
    paraphrase = ``rephrase``; neighbourhood = ``locality[0].loc`` (a natural question, no "?" added)
    answered by ``locality[0].loc_ans`` — the code uses only the first locality question."""
    subject = _text(_field(rec, "subject", cid), "subject", cid)
    prompt = _template(_text(_field(rec, "prompt", cid), "prompt", cid), subject, "prompt", cid)
    target = _text(_field(rec, "target", cid), "target", cid).strip()
    loc = _field(rec, "locality", cid)
    if not isinstance(loc, list) or not loc or not isinstance(loc[0], dict):
        raise DatasetError(f"case {cid}: field 'locality' must be a non-empty list of {{loc, loc_ans}}, got {loc!r}")
    return Record(
        case_id=cid,
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=target,
        paraphrase_prompts=(_text(_field(rec, "rephrase", cid), "rephrase", cid),),
        neighborhood_prompts=(_text(loc[0].get("loc"), "locality[0].loc", cid),),
        neighborhood_answer=_text(loc[0].get("loc_ans"), "locality[0].loc_ans", cid).strip(),
        dataset="qaedit",
    )


class SubjectNotInQuestion(DatasetError):
    """A WikiBigEdit record whose subject is not in its question: no key position for the
    subject-keyed methods; the loader skips it and counts it."""


def _optional_text(value: Any) -> str | None:
    """A string field that may be missing, ``null`` or ``NaN`` in the released files -> text or None."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def parse_wikibigedit(rec: dict[str, Any], cid: int) -> Record:
    """One WikiBigEdit record -> :class:`Record`, as the UltraEdit and EasyEdit loaders map it: prompt =
    ``update`` with the subject as ``{}``; target_new = target_true = ``ans`` (the new fact's answer;
    ``object`` may be longer); paraphrase = ``rephrase``; neighbourhood = ``loc`` answered by ``loc_ans``
    (a similar subject, same relation); portability = ``personas`` answered by ``ans`` and ``mhop``
    answered by ``mhop_ans`` where present (``null`` in many released records). ``tag`` and the
    Wikidata ids are not needed (``tag`` is sometimes ``null`` or ``NaN`` in the release)."""
    subject = _text(_field(rec, "subject", cid), "subject", cid)
    question = _text(_field(rec, "update", cid), "update", cid)
    if subject not in question:
        raise SubjectNotInQuestion(f"case {cid}: field 'subject' {subject!r} is not in field 'update' {question!r}")
    ans = _text(_field(rec, "ans", cid), "ans", cid).strip()
    portability = []
    if (persona := _optional_text(rec.get("personas"))) is not None:
        portability.append((persona, ans))
    hop, hop_ans = _optional_text(rec.get("mhop")), _optional_text(rec.get("mhop_ans"))
    if hop is not None and hop_ans is not None:
        portability.append((hop, hop_ans))
    return Record(
        case_id=cid,
        prompt=_template(question, subject, "update", cid),
        subject=subject,
        target_new=ans,
        target_true=ans,
        paraphrase_prompts=(_text(_field(rec, "rephrase", cid), "rephrase", cid),),
        neighborhood_prompts=(_text(_field(rec, "loc", cid), "loc", cid),),
        neighborhood_answer=_text(_field(rec, "loc_ans", cid), "loc_ans", cid).strip(),
        relation_id=_optional_text(rec.get("relation_id")),
        dataset="wikibigedit",
        portability=tuple(portability),
    )


def parse_ultraeditbench(rec: dict[str, Any], cid: int) -> Record:
    """One UltraEditBench record -> :class:`Record` (``data/ultraeditbench.py``'s mapping): prompt =
    ``prompt`` with the subject as ``{}``; target_new = target_true = ``ans``; paraphrase =
    ``rephrase_prompt``; neighbourhood = ``loc`` answered by ``loc_ans``."""
    subject = _text(_field(rec, "subject", cid), "subject", cid)
    ans = _text(_field(rec, "ans", cid), "ans", cid).strip()
    return Record(
        case_id=cid,
        prompt=_template(_text(_field(rec, "prompt", cid), "prompt", cid), subject, "prompt", cid),
        subject=subject,
        target_new=ans,
        target_true=ans,
        paraphrase_prompts=(_text(_field(rec, "rephrase_prompt", cid), "rephrase_prompt", cid),),
        neighborhood_prompts=(_text(_field(rec, "loc", cid), "loc", cid),),
        neighborhood_answer=_text(_field(rec, "loc_ans", cid), "loc_ans", cid).strip(),
        dataset="ultraeditbench",
    )


def looks_like(rec: Any) -> str | None:
    """The benchmark a record's fields suggest (``None``: none recognisable), to catch a file read as
    the wrong benchmark."""
    if not isinstance(rec, dict):
        return None
    if "update" in rec and "ans" in rec:
        return "wikibigedit"
    if "rephrase_prompt" in rec and "ans" in rec:
        return "ultraeditbench"
    if "requested_rewrite" in rec or "locality_prompt" in rec:
        return "counterfact"
    if "src" in rec or isinstance(rec.get("locality"), dict):
        return "zsre"
    if "target" in rec and isinstance(rec.get("locality"), list):
        return "qaedit"
    return None


def _check_benchmark(rec: Any, cid: Any, name: str) -> None:
    kind = looks_like(rec)
    if kind is not None and kind != name:
        raise DatasetError(
            f"case {cid}: dataset.name is {name!r} but the record looks like {_LABEL[kind]} "
            f"(fields {sorted(rec)}); set dataset.name: {kind}"
        )


def parse_qa_record(rec: Any, cid: int, name: str, target: Target = "answers") -> Record | None:
    """Record ``cid`` (its position) of a ZsRE or QAEdit file, its format detected from its fields;
    ``None`` for a record skipped under ``target="alt"`` (empty ``alt``)."""
    if not isinstance(rec, dict):
        raise DatasetError(f"case {cid}: every record must be a JSON object, got {type(rec).__name__}")
    _check_benchmark(rec, cid, name)
    if name == "qaedit":
        return parse_qaedit(rec, cid)
    if name == "wikibigedit":
        return parse_wikibigedit(rec, cid)
    if name == "ultraeditbench":
        return parse_ultraeditbench(rec, cid)
    if "src" in rec:
        return parse_zsre_mend(rec, cid, target)
    if "prompt" in rec:
        return parse_zsre_knowedit(rec, cid, target)
    raise DatasetError(f"case {cid}: missing field 'src' (ZsRE MEND format) or 'prompt' (KnowEdit format)")


def parse_qa_records(data: Any, name: str, target: Target = "answers", source: str = "dataset") -> list[Record]:
    """A JSON list of question-answering records (ZsRE, QAEdit, WikiBigEdit, UltraEditBench) -> records,
    case id = position.

    Under ``target="alt"`` ZsRE records with an empty ``alt`` are skipped (EasyEdit's ZsRE loader does the
    same) and the count is logged; so are WikiBigEdit records whose subject is not in their question;
    the others keep their positions as case ids."""
    if name not in QA_BENCHMARKS:
        raise DatasetError(f"dataset.name: {name!r} is not a question-answering benchmark {QA_BENCHMARKS}")
    if target == "alt" and name != "zsre":
        raise DatasetError(f"dataset.target: 'alt' applies to zsre only; {_LABEL[name]} records have one edit target")
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{source}: expected a non-empty JSON list of {_LABEL[name]} records")
    parsed: list[Record | None] = []
    no_subject = 0
    for i, rec in enumerate(data):
        try:
            parsed.append(parse_qa_record(rec, i, name, target))
        except SubjectNotInQuestion as e:
            if no_subject == 0:
                log.warning("%s: %s (skipped; the subject-keyed methods need it in the question)", source, e)
            no_subject += 1
    if no_subject:
        log.warning("%s: skipped %d of %d records whose subject is not in the question", source, no_subject, len(data))
    records = [r for r in parsed if r is not None]
    if len(records) < len(parsed):
        log.info(
            "%s: skipped %d of %d records with an empty 'alt' (dataset.target: alt; as EasyEdit's ZsRE loader)",
            source,
            len(parsed) - len(records),
            len(parsed),
        )
    if not records and no_subject:
        raise DatasetError(f"{source}: no record has its subject in its question; nothing to edit")
    if not records:
        raise DatasetError(f"{source}: every record has an empty 'alt'; nothing to edit with dataset.target: alt")
    return records


# ----------------------------------------------------------------------------------------------------
# Sources: a local path, a URL (downloaded once into a cache), or "demo"


#: The project's download cache on each node (datasets, probe files, stores under a URI, mirrored models).
CACHE_ENV = "MODEL_EDITING_CACHE"


def cache_dir() -> Path:
    """``$MODEL_EDITING_CACHE`` or ``~/.cache/model-editing-sweep`` (on a cluster, the head's state volume:
    cluster.yaml)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "model-editing-sweep"))


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
            raise SourceUnavailable(
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
        raise SourceUnavailable(f"dataset.source: {source!r} is not a file (give a path, a URL, or 'demo')")
    return path


def _read_json(source: str, sha256: str | None = None) -> tuple[Path, Any]:
    """The file's JSON, or its JSON lines as a list (UltraEditBench was released in both forms)."""
    path = resolve_source(source, sha256)
    text = path.read_text(encoding="utf-8")
    try:
        return path, json.loads(text)
    except json.JSONDecodeError as e:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            try:
                return path, [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                pass
        raise DatasetError(f"dataset.source: {path} is not valid JSON or JSON lines ({e})") from None


def load_counterfact(source: str = "demo", sha256: str | None = None) -> list[Record]:
    """All records of a CounterFact file (ROME or EasyEdit format, detected per record)."""
    path, data = _read_json(source, sha256)
    return parse_records(data, str(path))


def _load(name: str, source: str, sha256: str | None, target: Target) -> tuple[list[Record], int]:
    """(the records of benchmark ``name`` in ``source``, how many records the file holds)."""
    if name not in BENCHMARKS:
        raise DatasetError(f"dataset.name: {name!r} is not one of {', '.join(BENCHMARKS)}")
    if target not in ("answers", "alt"):
        raise DatasetError(f"dataset.target: {target!r} is not 'answers' or 'alt'")
    if target == "alt" and name != "zsre":
        raise DatasetError(
            f"dataset.target: 'alt' applies to zsre only (MEND's alt / KnowEdit's target_new); {_LABEL[name]} "
            "records have one edit target: use 'answers'"
        )
    if source == "demo" and name != "counterfact":
        raise DatasetError(
            f"dataset.source: 'demo' is the CounterFact demo set; for dataset.name {name!r} give a local "
            f"file or a URL" + (f" (the cluster default: {ZSRE_URL})" if name == "zsre" else "")
        )
    path, data = _read_json(source, sha256)
    if name == "mquake":  # cases of rewrites (sweep.evals.mquake): one record per rewrite
        from .mquake import case_records, parse_cases

        return case_records(parse_cases(data, str(path))), len(data)
    if name == "counterfact":
        if isinstance(data, list) and data:
            _check_benchmark(data[0], 0, name)
        return parse_records(data, str(path)), len(data)
    return parse_qa_records(data, name, target, str(path)), len(data)


def load_dataset(name: str, source: str, sha256: str | None = None, target: Target = "answers") -> list[Record]:
    """All records of benchmark ``name`` (one of :data:`BENCHMARKS`) in ``source`` (a path,
    a URL, or ``"demo"`` for CounterFact), validated before any model work.

    ``target`` is ZsRE's edit target: ``"answers"`` (the first gold answer: ROME/MEMIT/AlphaEdit) or
    ``"alt"`` (MEND's alternative answer: EasyEdit). The other benchmarks have one target per record,
    their own, which ``"answers"`` stands for; ``"alt"`` is refused there."""
    return _load(name, source, sha256, target)[0]


# ----------------------------------------------------------------------------------------------------
# Selection


def load_selection(dataset: DatasetConfig, n: int | None) -> list[Record]:
    """The records a trial with ``dataset`` settings and ``n`` edits uses, in their fixed order: the
    selection's records ``offset`` to ``offset + n``, shuffled with ``order_seed`` when it is set."""
    d = dataset
    records, size = _load(d.name, d.source, d.sha256, d.target)
    chosen = select(
        records,
        n=None if n is None else d.offset + n,
        case_ids=d.case_ids,
        sample_file=d.sample_file,
        sample=d.sample,
        unique_subjects_seed=d.unique_subjects_seed,
        file_records=None if d.name == "counterfact" else size,
    )
    if d.offset and len(chosen) <= d.offset:
        raise DatasetError(
            f"dataset.offset: the selection holds {len(chosen)} records, none after the first {d.offset}"
        )
    chosen = chosen[d.offset :]
    if d.order_seed is not None:
        random.Random(d.order_seed).shuffle(chosen)
    return chosen


def select(
    records: Sequence[Record],
    *,
    n: int | None = None,
    case_ids: Sequence[int] | None = None,
    sample_file: str | None = None,
    sample: int = 0,
    unique_subjects_seed: int | None = None,
    file_records: int | None = None,
) -> list[Record]:
    """Choose the records a trial edits, in a fixed order.

    - ``case_ids``: exactly these, in this order;
    - ``sample_file`` (``counterfact_sampled_unique_cf_10_20000.json`` / ``zsre_sampled_unique_10_10000.json``
      format: ``{"0": [ids...], ...}``): the ids of sample ``sample``, in order — the paper edits the first
      4,096 of sample 0 (see :func:`sample_ids` for ids the file lacks);
    - ``unique_subjects_seed``: shuffle with this seed and keep the first record of each subject;
    - otherwise the file order. Then the first ``n``.

    ``file_records``: for ZsRE/QAEdit records (case id = position), how many records the file holds,
    skipped ones included (default: the largest case id + 1).
    """
    by_id = {r.case_id: r for r in records}
    if case_ids is not None and sample_file is not None:
        raise DatasetError("dataset.case_ids: give case_ids or sample_file, not both")
    if sample_file is not None:
        positional = any(r.dataset != "counterfact" for r in records)
        if positional and file_records is None:
            file_records = max(by_id) + 1
        case_ids = sample_ids(sample_file, sample, by_id, file_records if positional else None)
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


def sample_ids(sample_file: str, sample: int, by_id: dict[int, Record], file_records: int | None = None) -> list[int]:
    """The ids of sample ``sample`` of ``sample_file`` that ``by_id`` holds, in order.

    - CounterFact (``file_records=None``): the case ids are the ROME file's own, and the sample files cover
      all of CounterFact; ids the file lacks are dropped (EasyEdit splits hold a part).
    - ZsRE/QAEdit (``file_records`` = the file's record count): ids are positions, and the ZsRE sample lists
      index ``zsre_mend_eval.json`` (19,086 records, :data:`ZSRE_URL`); a position in any other file is a
      different question, so an id at or beyond the file's end is an error (the file is not the one the
      list indexes). Ids of records skipped at load (empty ``alt``) are dropped, and the count logged.
    """
    if sample_file.startswith(("http://", "https://")):
        sample_file = str(fetch(sample_file))
    try:
        samples = json.loads(Path(sample_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset.sample_file: cannot read {sample_file} ({e})") from None
    if not isinstance(samples, dict) or str(sample) not in samples:
        have = sorted(samples)[:10] if isinstance(samples, dict) else type(samples).__name__
        raise DatasetError(f"dataset.sample: {sample} not in {sample_file} (has {have})")
    ids = samples[str(sample)]
    if file_records is not None:
        beyond = [i for i in ids if not 0 <= i < file_records]
        if beyond:
            raise DatasetError(
                f"dataset.sample_file: {len(beyond)} of the {len(ids)} ids of sample {sample} in {sample_file} "
                f"are not positions in this {file_records}-record file (e.g. {beyond[:5]}); ZsRE sample lists "
                f"index zsre_mend_eval.json (19,086 records, {ZSRE_URL}) by position and a position in another "
                "file is another question: use that file, or choose records with dataset.case_ids"
            )
        skipped = sum(i not in by_id for i in ids)
        if skipped:
            log.info(
                "dataset.sample_file: %d ids of sample %d are records skipped at load (empty alt)", skipped, sample
            )
    return [i for i in ids if i in by_id]
