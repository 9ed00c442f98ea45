"""Lines the VM tests collect about their costs (image, boot, each kernel's matrix); conftest.py
prints them at the end of the run, so CI's log says what each part took."""
COSTS: list[str] = []
