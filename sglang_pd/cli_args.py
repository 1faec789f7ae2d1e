"""Command line -> ServerArgs: flags named as SGLang's, ``--config FILE.yaml`` underneath, CLI on top."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml

from sglang_pd.server_args import ServerArgs, add_server_args


class OneLineParser(argparse.ArgumentParser):
    """Invalid flags end the program with one clear line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_server_args(argv: Sequence[str] | None, prog: str = "sglang-pd-server") -> ServerArgs:
    parser = OneLineParser(prog=prog, description="sglang-pd worker: an SGLang-compatible LLM server")
    parser.add_argument("--config", help="YAML file whose keys are flag names; the command line wins")
    add_server_args(parser)
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None)
    values: dict[str, Any] = {}
    if config:
        values.update(_load_config(parser, config))
    values.update(ns)
    try:
        args = ServerArgs.from_kwargs(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    try:
        args.cluster_key()  # an unreadable or too short secret fails here, with one line
    except ValueError as e:
        parser.error(str(e))
    if args.disaggregation_mode != "null" and args.disaggregation_transfer_backend == "fake":
        parser.error(
            "--disaggregation-transfer-backend fake moves KV inside one process (unit tests); "
            "separate prefill and decode servers need ucx"
        )
    return args


def _load_config(parser: OneLineParser, path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config {path}: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in names:
            parser.error(f"--config {path}: unknown key {key!r}")
        out[name] = value
    return out


if __name__ == "__main__":  # pragma: no cover - handy for checking a config file
    print(parse_server_args(sys.argv[1:]))
