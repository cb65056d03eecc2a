"""``python -m calibrate_teacher``."""

from calibrate_teacher.cli import main

if __name__ == "__main__":
    main()
