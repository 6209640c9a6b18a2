"""The `mirror` command line. Every flag of `mirror run` may also come from `MIRROR_<FLAG>`.

Errors end the program with one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mirror import __version__
from mirror.config import (
    ContainerdConfig,
    LogLevel,
    RunConfig,
    StoreKind,
    parse_address,
)
from mirror.errors import ConfigError, MirrorError

PROG = "mirror"


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage on error; operators want the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """Wrap a converter so argparse reports `invalid <what>` instead of a Python error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ConfigError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: {exc}") from exc

    parse.__name__ = what
    return parse


def _env_name(flag: str) -> str:
    return "MIRROR_" + flag.lstrip("-").replace("-", "_").upper()


class _FlagAdder:
    """Adds flags whose defaults come from the environment, so both paths share one parser."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ

    def __call__(self, flag: str, *, default: str | None, help: str, **kwargs: Any) -> None:
        env = _env_name(flag)
        value = self._environ.get(env, default)
        shown = f" (env {env}; default: {default})" if default is not None else f" (env {env})"
        self._parser.add_argument(flag, default=value, help=help + shown, **kwargs)


def _add_run(subparsers: Any, environ: Mapping[str, str]) -> None:
    run = subparsers.add_parser("run", help="run the node agent: the registry mirror and metrics")
    flag = _FlagAdder(run, environ)
    flag(
        "--store",
        default=StoreKind.AUTO.value,
        type=_typed(StoreKind, "store"),
        help="where bytes come from: auto (containerd when its socket answers, else cache), "
        "containerd, or cache",
    )
    flag(
        "--containerd-sock",
        default="/run/containerd/containerd.sock",
        type=Path,
        help="containerd's gRPC socket",
    )
    flag("--containerd-namespace", default="k8s.io", help="containerd namespace to serve")
    flag(
        "--containerd-content-path",
        default=None,
        type=Path,
        help="containerd's content store directory (default: asked from containerd)",
    )
    flag("--cache-dir", default="/var/lib/mirror", type=Path, help="the node cache directory")
    flag(
        "--registry-addr",
        default="0.0.0.0:5000",
        type=_typed(parse_address, "address"),
        help="HOST:PORT the registry API listens on",
    )
    flag(
        "--metrics-addr",
        default="0.0.0.0:9090",
        type=_typed(parse_address, "address"),
        help="HOST:PORT serving /metrics",
    )
    flag(
        "--log-level",
        default=LogLevel.INFO.value,
        type=_typed(LogLevel, "log level"),
        help="debug, info, warning or error",
    )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A cluster-local OCI registry mirror.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(subparsers, environ)
    return parser


def run_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        store=args.store,
        containerd=ContainerdConfig(
            socket=args.containerd_sock,
            namespace=args.containerd_namespace,
            content_path=args.containerd_content_path,
        ),
        cache_dir=args.cache_dir,
        registry_addr=args.registry_addr,
        metrics_addr=args.metrics_addr,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser(os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from mirror.node import run_node

            config = run_config(args)
            logging.basicConfig(
                level=config.log_level.upper(),
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            asyncio.run(run_node(config))
    except MirrorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
