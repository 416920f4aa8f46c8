"""kinema/lazy.py: package exports imported on first use. Checked in fresh interpreters, whose modules are clean."""

import json
import subprocess
import sys

import pytest

PACKAGES = ["kinema", "kinema.models", "kinema.data", "kinema.sampling", "kinema.pipelines", "kinema.pipelines.jobs",
            "kinema.loaders.animatediff", "kinema.loaders.easyanimate", "kinema.training", "kinema.eval", "kinema.api",
            "kinema.ui"]

# What `import kinema...` must not pull in: kinema --help stays fast, and the extras stay optional.
HEAVY = ("torch", "diffusers", "transformers", "gradio", "fastapi", "uvicorn", "ray")

# Exports that import an optional extra (gradio: seconds); tests/ui/test_app.py imports them, through the package.
WITH_EXTRA = {"kinema.ui": ("build_app", "launch_app")}


def run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_a_package_imports_none_of_its_exports(package):
    found = run(f"import sys, json, importlib; importlib.import_module({package!r}); "
                f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    assert found == []


def test_every_export_resolves_to_its_defining_module_and_is_kept():
    found = run(
        "import importlib, json\n"
        f"packages = [importlib.import_module(name) for name in {PACKAGES!r}]\n"
        "report = {}\n"
        f"skipped = {WITH_EXTRA!r}\n"
        "for package in packages:\n"
        "    for name in getattr(package, '__all__', ()):  # kinema.api exports nothing\n"
        "        if name in skipped.get(package.__name__, ()):\n"
        "            continue\n"
        "        value = getattr(package, name)\n"
        "        report[package.__name__ + '.' + name] = [name in vars(package), name in dir(package)]\n"
        "print(json.dumps(report))")
    assert len(found) > 40 and all(kept and listed for kept, listed in found.values())


def test_an_unknown_name_is_an_attribute_error():
    import kinema.models

    with pytest.raises(AttributeError, match="module 'kinema.models' has no attribute 'VideoNet'"):
        kinema.models.VideoNet  # noqa: B018


@pytest.mark.parametrize("package", PACKAGES)
def test_no_export_is_named_like_a_module_of_its_package(package):
    # Importing a submodule sets it as the package's attribute of that name, so an export of the same name would
    # turn into the module once anything imported it first: `from kinema.pipelines import text_to_video` made
    # `from kinema.pipelines import generate` the module kinema/pipelines/generate.py.
    import importlib
    import importlib.util

    module = importlib.import_module(package)
    if not hasattr(module, "__path__"):  # a module has no modules of its own
        return
    clashes = [name for name in getattr(module, "__all__", ()) if importlib.util.find_spec(f"{package}.{name}")]
    assert clashes == []


def test_generate_stays_the_function_after_its_module_is_imported():
    found = run("import json, kinema.pipelines.generation, kinema.pipelines.from_parts\n"
                "from kinema.pipelines import generate, text_to_video\n"
                "print(json.dumps([callable(generate) and generate.__module__, text_to_video.__module__]))")
    assert found == ["kinema.pipelines.generation", "kinema.pipelines.from_parts"]
