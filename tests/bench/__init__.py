"""cellbox's benchmark: the daemon against jupyter_client talking to the same kernels directly.

Run it with `python -m tests.bench [--quick] [--json PATH] [--backends local,docker]`;
README.md in this folder says what each case measures.
"""
