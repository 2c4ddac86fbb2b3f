"""What every `eventcore` command shares: the store URL from --dsn or the environment, and what
stdout and a URL look like in messages."""
from __future__ import annotations

import os
import sys

from ..errors import EventCoreError


def dsn_of(args) -> str:
    dsn = args.dsn or os.environ.get("EVENTCORE_DSN")
    if not dsn:
        raise EventCoreError("no database: pass --dsn URL or set EVENTCORE_DSN")
    return dsn


def scheme_of(dsn: str) -> str:
    """The URL's scheme, for messages: never the whole string (a libpq key=value DSN may hold a password)."""
    return dsn.split("://", 1)[0].lower() if "://" in dsn else "none"


def stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (stdout replaced, e.g. captured)
        sys.stdout = open(os.devnull, "w")


def import_event_modules(args) -> None:
    """Import the modules named by --import (each defining event classes and upcasters), so that the
    command knows those types as the application does. An import that fails is an EventCoreError."""
    import importlib

    for name in getattr(args, "imports", None) or ():
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` finds a module of the current directory
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - whatever the module raised, said in one line
            raise EventCoreError(f"--import {name}: {type(exc).__name__}: {exc}") from None
