"""Render or check the VM job from the command line.

    python -m jobspecs check                       render every template at its min/default/max sizes, both targets
    python -m jobspecs variables                   the variables table (name, type, default, description)
    python -m jobspecs render --template tiny --id demo --owner 1 --overlay /srv/vms/demo.qcow2 [--json]
                              [--target local|nomad]

Paths come from the environment like the gateway's (IMAGES_DIR, else DATA_DIR/images, else data/images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from jobspecs.catalog import DEFAULT_CATALOG, SIZE_NAMES, CatalogError, load_catalog
from jobspecs.hcl import to_hcl
from jobspecs.render import TARGETS, JobSettings, JobSpecError, VMSpec, render_job, variables


def _images_dir() -> Path:
    if os.environ.get("IMAGES_DIR"):
        return Path(os.environ["IMAGES_DIR"])
    repo = DEFAULT_CATALOG.parent.parent
    return Path(os.environ.get("DATA_DIR") or repo / "data") / "images"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobspecs", description=__doc__.split("\n")[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--images-dir", type=Path, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    sub.add_parser("variables")
    render = sub.add_parser("render")
    render.add_argument("--template", required=True)
    render.add_argument("--id", required=True)
    render.add_argument("--owner", required=True)
    render.add_argument("--overlay", required=True)
    render.add_argument("--hostname")
    for size in SIZE_NAMES:
        render.add_argument(f"--{size.replace('_', '-')}", dest=size, type=int)
    render.add_argument("--json", action="store_true", help="print the API JSON instead of HCL")
    render.add_argument("--target", choices=TARGETS, default="local",
                        help="local (VNC on a unix socket) or nomad (a VNC port registered in Consul)")
    args = parser.parse_args(argv)

    if args.command == "variables":
        for name, var in variables().items():
            default = json.dumps(var["default"]) if "default" in var else "(required)"
            print(f"{name:<14} {var['type']:<13} {default:<11} {var['description']}")
        return 0
    try:
        templates = load_catalog(args.catalog, args.images_dir or _images_dir())
        if args.command == "check":
            for template in templates.values():
                for pick in (0, None, 1):
                    sizes: dict[str, Any] = {size: (getattr(template.defaults, size) if pick is None
                                    else template.limits.bounds(size)[pick]) for size in SIZE_NAMES}
                    vm = VMSpec.for_template(template, id="check", owner="0", overlay_path="/vms/check.qcow2",
                                             **sizes)
                    for target in TARGETS:
                        to_hcl(render_job(vm, template, JobSettings(target=target)))
                print(f"{template.name}: renders at min, default and max sizes"
                      + ("" if template.is_built() else f" (image not built in {template.image_dir})"))
            return 0
        if args.template not in templates:
            raise JobSpecError("template", f"no template {args.template!r} in {args.catalog}")
        template = templates[args.template]
        sizes = {size: getattr(args, size) for size in SIZE_NAMES}
        vm = VMSpec.for_template(template, id=args.id, owner=args.owner, overlay_path=args.overlay,
                                 hostname=args.hostname, **sizes)
        job = render_job(vm, template, JobSettings(target=args.target))
        print(json.dumps({"Job": job}, indent=2) if args.json else to_hcl(job), end="" if not args.json else "\n")
        return 0
    except (CatalogError, JobSpecError) as exc:
        print(f"jobspecs: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
