"""The weights stage: each source's pretrained weights fetched, verified, and recorded for extract and train.

A record names the verified local file, its full sha256, the architecture, the cut and the
preprocessing: everything `headstart.sources.load_source` needs to rebuild the source network.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from headstart.backbones import create_model, get_architecture
from headstart.caching import cached, run_logger
from headstart.checkpoints import build_model
from headstart.config import AUTO_CUT, SourceParams, WeightsParams
from headstart.images import Preprocess
from headstart.records import Output, SourceWeights, WeightsRecord, relative
from headstart.sources import Fetched, fetch
from headstart.uris import WeightsURI, parse_uri


def check_source(name: str, source: SourceParams) -> WeightsURI:
    """Fail before any download when the URI form, the architecture or the cut point is wrong."""
    try:
        parsed = parse_uri(source.weights)
        get_architecture(source.arch)
    except (ValueError, KeyError) as err:
        raise ValueError(f"sources.{name}: {err.args[0]}") from None
    if parsed.kind == "torchvision" and parsed.target != source.arch:
        raise ValueError(
            f"sources.{name}: weights {source.weights!r} are for {parsed.target!r}, but arch is {source.arch!r}"
        )
    cuts = create_model(source.arch, 1).cut_names
    if resolved_cut(source) not in cuts:
        raise ValueError(f"sources.{name}.cut is {source.cut!r}; {source.arch} has the cut points {cuts}")
    return parsed


def resolved_cut(source: SourceParams) -> str:
    """The source's cut, `auto` being its architecture's default cut."""
    return get_architecture(source.arch).default_cut if source.cut == AUTO_CUT else source.cut


def check_fetched(name: str, source: SourceParams, fetched: Fetched) -> None:
    """A headstart model's own spec must agree with the source's arch, and hold the cut."""
    spec = fetched.spec
    if spec is None:
        return
    if spec.arch != source.arch:
        raise ValueError(f"sources.{name}: {fetched.path} holds a {spec.arch!r} model, but arch is {source.arch!r}")
    if spec.cut is not None:
        cuts = build_model(spec).cut_names
        if resolved_cut(source) not in cuts:
            raise ValueError(
                f"sources.{name}.cut is {source.cut!r}; the model in {fetched.path} has the cut points {cuts}"
            )


def source_preprocess(source: SourceParams, fetched: Fetched) -> Preprocess:
    """The source's image size (else the weights' own), the architecture's channels, the weights' mean/std."""
    arch = get_architecture(source.arch)
    return Preprocess(
        image_size=source.image_size or fetched.image_size or arch.image_size,
        channels=arch.channels,
        mean=fetched.mean if fetched.mean is not None else arch.mean,
        std=fetched.std if fetched.std is not None else arch.std,
    )


def make_record(name: str, source: SourceParams, fetched: Fetched) -> SourceWeights:
    return SourceWeights(
        source=name,
        uri=source.weights,
        path=relative(fetched.path),
        sha256=fetched.sha256,
        arch=source.arch,
        cut=resolved_cut(source),
        preprocess=source_preprocess(source, fetched),
    )


@task(**cached("weights"))
def weights(sources: dict[str, SourceParams], params: WeightsParams, out_dir: Path, cache_dir: Path) -> WeightsRecord:
    """Fetch and verify every source's weights; write `out_dir/<source>.json` (what extract@<source> depends on)."""
    log = run_logger()
    sources = {name: SourceParams.model_validate(s) for name, s in sources.items()}
    for name, source in sources.items():
        check_source(name, source)
    records: dict[str, SourceWeights] = {}
    outputs = []
    for name, source in sources.items():
        fetched = fetch(source.weights, source.sha256, params, Path(cache_dir))
        check_fetched(name, source, fetched)
        records[name] = make_record(name, source, fetched)
        log.info("source %s: %s -> %s (sha256 %s)", name, source.weights, fetched.path, fetched.sha256)
        final = Path(out_dir) / f"{name}.json"
        records[name].write(final)
        outputs += [Output.of(final), Output.of(fetched.path)]
    return WeightsRecord(sources=records, outputs=outputs)
