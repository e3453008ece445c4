"""Write the demo task's data files (sort digits; polite vs terse): a thin CLI over jaxalign.eval.tasks.demo."""

import sys

from jaxalign.eval.tasks.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
