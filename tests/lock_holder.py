"""A stand-in for a running experiment: holds RUN_DIR/run.lock (flock, with the pid and host
recorded) until killed. Prints "held" once it holds it.

    python tests/lock_holder.py RUN_DIR
"""

import fcntl
import json
import os
import socket
import sys
import time


def main(run_dir: str) -> None:
  os.makedirs(run_dir, exist_ok=True)
  fd = os.open(os.path.join(run_dir, "run.lock"), os.O_RDWR | os.O_CREAT, 0o666)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": "now"}).encode(), 0)
  print("held", flush=True)
  time.sleep(3600)


if __name__ == "__main__":
  main(sys.argv[1])
