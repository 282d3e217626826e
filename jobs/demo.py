"""`make demo`: the whole pipeline on the embedded default, on CPU, with nothing downloaded.

Steps that exist today run for real; each prints the command a user would type.
"""

from __future__ import annotations

import subprocess
import sys
import time

STEPS = [
    ("validate config and data (dry run)",
     [sys.executable, "jobs/finetune.py", "--dry_run", "--base_model", "models/tiny-chatglm2",
      "--data_path", "data/sample.json"]),
]

NOT_YET = ["fine-tune on Ray (jobs/finetune.py)", "merge and register (jobs/merge.py)",
           "serve and chat (serving/)"]


def main() -> int:
    t0 = time.time()
    for title, cmd in STEPS:
        print(f"\n=== {title}\n$ {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"demo stopped: step '{title}' failed", file=sys.stderr)
            return 1
    print(f"\ndemo finished in {time.time() - t0:.0f} s.")
    print("The demo stops here: these steps are not built yet: " + "; ".join(NOT_YET) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
