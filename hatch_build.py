"""Build hook: compile ``src/meterops/store/_columns.c`` into the package.

It is the SQLite module that lets the embedded store bind whole columns
(``meterops.store._native``). Without a C compiler or SQLite's headers the
package still builds and works: the store then binds row by row, slower.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/meterops/store/_columns.c")


class ColumnsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        source = Path(self.root) / SOURCE
        target = source.with_name("libmocolumns.so.1")
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            self.app.display_warning("meterops: no C compiler; SQLite writes bind row by row")
            return
        command = [compiler, "-O2", "-shared", "-fPIC", "-o", str(target), str(source)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            self.app.display_warning(
                f"meterops: {SOURCE} did not compile (SQLite writes bind row by row; "
                f"Debian: apt-get install libsqlite3-dev):\n{done.stderr}"
            )
            return
        build_data["artifacts"].append(str(target.relative_to(self.root)))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
