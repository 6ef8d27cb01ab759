"""The Swift and Kotlin bindings: generated from the same library, checked for drift, and
the Kotlin ones compiled and run against `meridian dev`."""

import json
import os
import pathlib
import subprocess

import pytest

from conftest import ROOT

KOTLIN = ROOT / "ffi" / "kotlin"
KOTLINC = KOTLIN / "node_modules" / "kotlin-compiler" / "bin" / "kotlinc"
KOTLIN_LIB = KOTLIN / "node_modules" / "kotlin-compiler" / "lib"
JNA = pathlib.Path(os.environ.get("JNA_JAR", "/usr/share/java/jna.jar"))


def test_the_committed_swift_and_kotlin_bindings_match_the_library():
    done = subprocess.run(
        [str(ROOT / "scripts" / "bindings"), "check"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr + done.stdout


def kotlin_toolchain():
    missing = [str(p) for p in (KOTLINC, JNA) if not p.exists()]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run `npm ci` in ffi/kotlin and "
            "`apt-get install libjna-java` (scripts/test does both)",
            pytrace=False,
        )


def test_the_kotlin_bindings_compile_and_make_a_first_edit(dev, tmp_path):
    kotlin_toolchain()
    jar = tmp_path / "first-edit.jar"
    classpath = f"{JNA}:{KOTLIN_LIB / 'kotlinx-coroutines-core-jvm.jar'}"
    compiled = subprocess.run(
        [
            str(KOTLINC),
            "-Werror",
            "-cp",
            classpath,
            str(KOTLIN / "generated" / "uniffi" / "meridian_ffi" / "meridian_ffi.kt"),
            str(KOTLIN / "example" / "FirstEdit.kt"),
            "-d",
            str(jar),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compiled.returncode == 0, compiled.stderr
    ran = subprocess.run(
        [
            "java",
            f"-Djna.library.path={ROOT / 'target' / 'debug'}",
            "-cp",
            f"{jar}:{KOTLIN_LIB / 'kotlin-stdlib.jar'}:{classpath}",
            "FirstEditKt",
            dev.config,
            "kotlin/first-edit",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert "cancelled a wait" in ran.stdout and "refused:" in ran.stdout
    seen = json.loads(dev.cli("doc", "get", "--config", dev.config, "kotlin/first-edit"))
    assert seen == {"from": "kotlin", "text": "hello from Kotlin", "paused": True}
