import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports run (~1 s): nothing has started, no traceback
    sys.exit(130)

sys.exit(main())
