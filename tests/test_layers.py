"""The package's layering (rlr_dist/README.md), checked on the source: pure maths never imports Ray, the
iteration skeleton never imports a transport, and the core never imports the toy world."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rlr_dist"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


CORE = ("chain", "estimators", "regularisers", "rewards", "models", "train", "pipeline", "tune")
RULES = [  # (packages, forbidden import prefixes)
    (("chain", "estimators", "regularisers"), ("ray", "deepspeed", "mlflow", "rlr_dist.models", "rlr_dist.train",
                                                "rlr_dist.pipeline", "rlr_dist.rewards")),
    (("rewards", "models"), ("ray", "deepspeed", "mlflow", "rlr_dist.train", "rlr_dist.pipeline",
                             "rlr_dist.estimators")),
    (("train",), ("ray", "deepspeed", "mlflow", "rlr_dist.pipeline", "rlr_dist.tune", "rlr_dist.bench")),
    (CORE, ("rlr_dist.toy_world", "rlr_dist.bench")),
]


@pytest.mark.parametrize("packages, forbidden", RULES, ids=[",".join(p) for p, _ in RULES])
def test_layers_import_only_what_they_may(packages, forbidden):
    bad = []
    for pkg in packages:
        for path in sorted((PKG / pkg).rglob("*.py")):
            for mod in _imports(path):
                if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PKG.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_every_package_says_what_it_holds_and_may_import():
    for pkg in [p for p in PKG.iterdir() if (p / "__init__.py").is_file()]:
        readme = pkg / "README.md"
        assert readme.is_file() and "import" in readme.read_text(), pkg.name
