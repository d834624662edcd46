"""``python -m pipelines.ultraclean``: the UltraClean job, locally or under ``ray job submit``.

    python -m pipelines.ultraclean [--config configs/x.yaml] [--output DIR]   # run (embedded default config)
    python -m pipelines.ultraclean verify DIR                                  # re-check a version's checksums
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.config import ConfigError, load_config
from pipelines.ingest import IngestResult, run_ingest
from pipelines.versioning import DatasetVersion, verify_version


def format_summary(result: IngestResult) -> str:
    manifest = result.manifest
    lines = [f"{'stage':<26}{'in':>9}{'out':>9}{'dropped':>9}{'quar.':>7}{'sec':>8}  top reasons"]
    for row in manifest["stages"]:
        reasons = sorted(row["dropped"].items(), key=lambda kv: -kv[1])[:3]
        seconds = result.stage_seconds.get(row["stage"], 0.0)
        lines.append(
            f"{row['stage']:<26}{row['in']:>9}{row['out']:>9}{sum(row['dropped'].values()):>9}{row['quarantined']:>7}"
            f"{seconds:>8.2f}  {', '.join(f'{k}={v}' for k, v in reasons)}"
        )
    accounting = manifest["accounting"]
    throughput = accounting["records_in"] / result.seconds if result.seconds else 0.0
    lines.append(
        f"{accounting['records_in']} records in: {accounting['kept']} kept, {accounting['dropped']} dropped, "
        f"{accounting['quarantined']} quarantined ({accounting['quarantine_entries']} quarantine entries); "
        f"{result.seconds:.1f} s wall, {throughput:.1f} records/s"
    )
    return "\n".join(lines)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ultraclean", description="Run the UltraClean job.")
    parser.add_argument("--config", help="YAML config (default: the embedded configs/default.yaml)")
    parser.add_argument("--output", help="dataset root, overriding output.root")
    args = parser.parse_args(argv)
    config, base_dir = load_config(args.config)
    result = run_ingest(config, base_dir, Path(args.output) if args.output else None)
    if result.reused:
        print(f"version {result.version_path.name} already complete at {result.version_path}: nothing to do")
    else:
        print(format_summary(result))
    print(f"dataset version: {result.version_path}")
    return 0


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ultraclean verify")
    parser.add_argument("version", help="a version directory, or a dataset root (checks its latest version)")
    args = parser.parse_args(argv)
    version = DatasetVersion.open(args.version)
    problems = verify_version(version.path)
    for problem in problems:
        print(f"FAILED {problem}")
    print(f"{version.version_id}: {len(version.manifest['shards'])} shards, {'corrupt' if problems else 'intact'}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            return _verify(argv[1:])
        return _run(argv[1:] if argv[:1] == ["run"] else argv)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
