"""`python -m runtime.container.interceptor`: the same as `secure-proxy-interceptor`."""

import sys

from runtime.container.interceptor.main import main

sys.exit(main())
