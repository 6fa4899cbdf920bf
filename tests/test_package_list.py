"""setup.cfg lists every package under caffe_compat/: a package left out installs
editable (as in development) but is missing from a wheel, so a user's
`pip install .` breaks where the tests pass."""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = {line.strip() for line in config["options"]["packages"].splitlines() if line.strip()}
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "caffe_compat").rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found - listed == set(), f"packages missing from setup.cfg: {sorted(found - listed)}"
