"""``python -m vfio_user_dev.link FILE``: list a TLP capture file."""

import sys

from vfio_user_dev.link.capture_cli import main

if __name__ == "__main__":
    sys.exit(main())
