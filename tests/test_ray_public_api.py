"""The package uses Ray's public API only: a private module (``ray._private``, ``ray._raylet``,
any ``_internal`` package) or one of Ray's not-yet-public trees (``ray.train.v2``,
``ray.autoscaler.v2``) changes without notice between minors, and pyproject pins Ray to the
tested minor. Imports are read as tests/test_layers.py reads them (anywhere in a module, relative
ones resolved), and so are ``ray._x`` attribute chains; the check is tried on a fake package
first, so that it can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_layers import ROOT, module_name, parse_package

NOT_PUBLIC = ("ray.train.v2", "ray.autoscaler.v2", "ray.autoscaler._private")


def is_private(name: str) -> bool:
    """A Ray module outside its public API: a part named ``_x`` or a not-yet-public tree."""
    parts = name.split(".")
    if parts[0] != "ray":
        return False
    if any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
        return True
    return any(name == t or name.startswith(t + ".") for t in NOT_PUBLIC)


def attribute_chains(tree: ast.AST) -> set[str]:
    """Dotted names rooted at ``ray`` used as attributes (``ray._private.state.x``)."""
    out = set()
    for node in ast.walk(tree):
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "ray" and parts:
            out.add(".".join(["ray", *reversed(parts)]))
    return out


def private_uses(root: Path) -> list[str]:
    imports, _ = parse_package(root)
    found = [f"{m} imports {n}" for m, names in imports.items() for n in names if is_private(n)]
    for f in sorted(root.rglob("*.py")):
        chains = attribute_chains(ast.parse(f.read_text(), str(f)))
        found += [f"{module_name(f, root)} uses {c}" for c in sorted(chains) if is_private(c)]
    return sorted(found)


def test_the_check_finds_private_ray_on_a_fake_package(tmp_path: Path) -> None:
    pkg = tmp_path / "sepp_ray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        "import ray\nfrom ray.train import UserCallback\nfrom ray.util.queue import Queue\n"
        "ray.util.get_node_ip_address()\nx = ray.__version__\n"
    )
    (pkg / "bad.py").write_text(
        "def f():\n"
        "    from ray.train.v2.api.callback import UserCallback\n"
        "    from ray._private.state import available_resources_per_node\n"
        "    import ray.data._internal.util\n"
        "    import ray\n"
        "    return ray._raylet.NodeID\n"
    )
    assert private_uses(pkg) == [
        "sepp_ray.bad imports ray._private.state",
        "sepp_ray.bad imports ray.data._internal.util",
        "sepp_ray.bad imports ray.train.v2.api.callback",
        "sepp_ray.bad uses ray._raylet",
        "sepp_ray.bad uses ray._raylet.NodeID",
    ]


def test_the_package_uses_only_public_ray() -> None:
    found = private_uses(ROOT)
    assert not found, "private Ray API (use the public one):\n  " + "\n  ".join(found)
