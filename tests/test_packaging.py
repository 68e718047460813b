"""A built wheel, installed outside the checkout, runs from any directory.

The wheel is built from a copy of the sources (so the checkout gets no build/ and no stale files
leak in), installed into a fresh venv that borrows only the dependencies of the running
interpreter, and run from a directory holding a stray ``attacks.py``. Nothing may come from the
checkout: neither the code nor conf/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import fast_overrides

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "attacks", "defenses", "common")
# What the build reads besides the repository's top-level files (pyproject.toml, README.md, a
# LICENSE): the packages and conf/, which pyproject.toml maps onto bench.conf.
SOURCE_DIRS = ("conf", *PACKAGES)

STRAY_ATTACKS = 'raise RuntimeError("the stray attacks.py in the working directory was imported")\n'
MY_DEFENSE = '''
from defenses.none import NoDefense


class MyDefense(NoDefense):
    """The identity, defined in the working directory rather than in PureBench."""
'''


def _env() -> dict[str, str]:
    # No PYTHONPATH: the checkout must not reach the venv through it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300
    )


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def _copy_sources(dest: Path) -> None:
    dest.mkdir()
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCE_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` of a copy of the checkout, without build isolation (no network)."""
    if importlib.util.find_spec("setuptools.build_meta") is None:
        pytest.skip("setuptools (the build backend) is not installed in this interpreter")
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None:
        if importlib.util.find_spec("wheel") is None:
            pytest.skip("neither setuptools>=70.1 nor the wheel package can build wheels here")
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_sources(tmp / "src")
    built = _run(
        _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", "dist")
        + [str(tmp / "src")],
        tmp,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = (tmp / "dist").glob("purebench-*.whl")
    return path


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from the running interpreter."""
    venv = tmp_path_factory.mktemp("venv")
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv
    )
    # A path line in a .pth only extends sys.path: the .pth files in that directory (the editable
    # install's finder among them) are not processed, so the checkout stays out of this venv.
    paths = sysconfig.get_paths()
    deps = dict.fromkeys([paths["purelib"], paths["platlib"]])
    (Path(site.stdout.strip()) / "purebench_test_deps.pth").write_text(
        "".join(f"{d}\n" for d in deps)
    )
    installed = _run(
        _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)), venv
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return python


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with a stray ``attacks.py`` and a user's own defense module."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "attacks.py").write_text(STRAY_ATTACKS)
    (work / "my_defense.py").write_text(MY_DEFENSE)
    return work


def test_the_wheel_holds_every_module_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"bench/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    expected |= {
        p.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(expected - names)
    # A new subpackage must be listed in pyproject.toml's [tool.setuptools] packages.
    assert not missing, f"not in the wheel (list the package in pyproject.toml): {missing}"


def test_the_venv_imports_the_installed_copy_not_the_checkout(
    venv_python: Path, workdir: Path
) -> None:
    # -P: no working directory on sys.path, as `python -m bench` arranges for itself.
    code = (
        "import attacks, bench, bench.config; "
        "print(attacks.__file__, bench.__file__, bench.config.CONF_DIR)"
    )
    done = _run([str(venv_python), "-P", "-c", code], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = [Path(p) for p in done.stdout.split()]
    venv = venv_python.parent.parent
    for path in paths:
        assert path.is_relative_to(venv) and not path.is_relative_to(ROOT), paths
    assert (paths[2] / "eval.yaml").is_file()


def test_python_m_bench_runs_from_a_directory_with_a_stray_attacks_py(
    venv_python: Path, workdir: Path, cache_dir: Path
) -> None:
    overrides = {
        arg.split("=", 1)[0]: arg for arg in fast_overrides(cache_dir, workdir / "results")
    }
    # A clean-accuracy run: what is under test is the install, not the attacks.
    overrides |= {
        "suite": "suite=clean",
        "n_samples": "n_samples=16",
        "threads": "threads=1",
        "paths.data_dir": "paths.data_dir=data",
    }
    args = [*overrides.values(), "defense._target_=my_defense.MyDefense", "hydra.run.dir=run"]
    done = _run([str(venv_python), "-m", "bench", *args], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((workdir / "run" / "record.json").read_text())
    assert record["status"] == "completed" and record["n_samples"] == 16
    # The user's module in the working directory is still importable (sys.path's end).
    assert record["config"]["defense"]["_target_"] == "my_defense.MyDefense"


def test_the_editable_checkout_also_ignores_a_stray_attacks_py(workdir: Path) -> None:
    # An editable install's finder runs after every sys.path entry, so moving the working
    # directory to the end alone would still let the stray file win (`make install` is editable).
    where = _run([sys.executable, "-P", "-c", "import attacks; print(attacks.__file__)"], workdir)
    if not Path(where.stdout.strip()).is_relative_to(ROOT):
        pytest.skip("the running interpreter does not import purebench from this checkout")
    done = _run([sys.executable, "-m", "bench", "--help"], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "shadows" not in done.stderr


def test_a_module_shadowing_a_package_fails_in_one_line(venv_python: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "attacks.py").write_text(STRAY_ATTACKS)
    # On PYTHONPATH it comes before site-packages, which moving the working directory cannot fix.
    done = _run(
        [str(venv_python), "-m", "bench", "dataset=digits"],
        tmp_path,
        env={**_env(), "PYTHONPATH": str(shadow)},
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(shadow / "attacks.py") in lines[0], done.stderr[-3000:]
    assert "shadows PureBench's `attacks` package" in lines[0]
