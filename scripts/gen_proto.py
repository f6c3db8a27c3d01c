"""Regenerate the Connect code in src/osqueue/_proto from proto/osqueue/v1/queue.proto.

    .venv/bin/python scripts/gen_proto.py            # rewrite src/osqueue/_proto
    .venv/bin/python scripts/gen_proto.py --out DIR  # write elsewhere (the drift test does)

Needs the dev extra: grpcio-tools (it bundles protoc), protoc-gen-py (messages for
protobuf-py) and protoc-gen-connectrpc (the Connect service stubs). The versions are pinned
in pyproject.toml, so the output is the same on every machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ("osqueue/v1/queue.proto",)
DEFAULT_OUT = ROOT / "src" / "osqueue" / "_proto"
PLUGINS = ("protoc-gen-py", "protoc-gen-connectrpc")


def _plugin(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found; install the dev extra: pip install -e '.[dev]'")
    return found


def generate(out_dir: Path) -> None:
    """Write the generated modules under ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        *(f"--plugin={name}={_plugin(name)}" for name in PLUGINS),
        f"--py_out={out_dir}",
        f"--connectrpc_out={out_dir}",
        *PROTO_FILES,
    ]
    subprocess.run(command, check=True, cwd=PROTO_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output directory (default: src/osqueue/_proto)")
    args = parser.parse_args(argv)
    if args.out is not None:
        generate(args.out)
        return 0
    # Replace the checked-in tree whole, so a removed message leaves no stale module.
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        shutil.rmtree(DEFAULT_OUT, ignore_errors=True)
        shutil.copytree(tmp, DEFAULT_OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
