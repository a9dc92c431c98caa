"""Runs a command on a terminal and plays a script at it, as a user would.

    python3 drive.py STEPS_JSON COMMAND [ARG...]

The command gets a new pty as its controlling terminal (stdin, stdout and
stderr), so Ctrl-C typed there (`\\u0003`) reaches it as the terminal's SIGINT.
STEPS_JSON is a list of ["expect", TEXT] (wait, at most 60 s, for TEXT to be
printed after what the previous step saw) and ["type", TEXT]. Prints one JSON
object: {"exit": the command's exit code, "output": all it printed}, or exits
1 saying which step was not met.
"""

import json
import os
import pty
import select
import signal
import sys
import time

steps = json.loads(sys.argv[1])
argv = sys.argv[2:]

pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)

output = b""
seen = 0


def read_some(deadline):
    """Appends what the terminal printed until `deadline`; False at its end."""
    global output
    left = deadline - time.monotonic()
    if left <= 0:
        return True
    ready, _, _ = select.select([fd], [], [], left)
    if not ready:
        return True
    try:
        chunk = os.read(fd, 4096)
    except OSError:  # EIO: the command ended and closed the terminal
        chunk = b""
    if not chunk:
        return False
    output += chunk
    return True


def give_up(why):
    os.kill(pid, signal.SIGKILL)
    print(f"{why}; the terminal showed:\n{output.decode(errors='replace')}", file=sys.stderr)
    sys.exit(1)


for action, text in steps:
    if action == "type":
        os.write(fd, text.encode())
        continue
    needle = text.encode()
    deadline = time.monotonic() + 60
    while output.find(needle, seen) < 0:
        if time.monotonic() >= deadline:
            give_up(f"waited 60 s for {text!r}")
        if not read_some(deadline):
            give_up(f"the command ended before printing {text!r}")
    seen = output.find(needle, seen) + len(needle)

deadline = time.monotonic() + 60
while read_some(deadline):
    if time.monotonic() >= deadline:
        give_up("the command did not end within 60 s of the last step")
_, status = os.waitpid(pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "output": output.decode(errors="replace")}))
