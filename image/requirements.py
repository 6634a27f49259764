"""Print the runtime dependencies declared in pyproject.toml, one per line.

The image's builder stage pipes this into `pip wheel -r -`, so the dependency
layer is built from pyproject.toml alone: a source change does not rebuild it.
Markers (python_version) stay on the lines and pip evaluates them.
"""

import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project.get("dependencies", [])))
