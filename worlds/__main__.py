"""`python -m worlds validate`: the Animals judge measured on fresh renders of its world
(animals.main)."""

import sys

from worlds import animals


def main() -> None:
    # the command's name in its usage line, not this file's
    sys.argv[0] = "python -m worlds"
    animals.main()


if __name__ == "__main__":
    main()
