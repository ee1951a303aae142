"""`crofter config show|set|path`."""
from __future__ import annotations

import dataclasses
import json

from models import paths

from .. import config


def run(args) -> int:
    if args.config_command == "path":
        print(paths.config_path())
        return 0
    if args.config_command == "set":
        settings = config.set_value(args.key, args.value)
        print(f"{args.key} = {getattr(settings, args.key)!r}")
        return 0
    settings = config.load()
    values = dataclasses.asdict(settings)
    if args.json:
        print(json.dumps(values, indent=2))
        return 0
    docs = config.Settings.docs()
    width = max(map(len, values))
    for key, value in values.items():
        print(f"{key:<{width}}  {value!r:<18}  {docs[key]}")
    return 0
