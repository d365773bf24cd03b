"""``python -m vfio_user_dev.link FILE``: list a TLP capture file."""

import sys

from vfio_user_dev.link.capture_cli import main

sys.exit(main())
