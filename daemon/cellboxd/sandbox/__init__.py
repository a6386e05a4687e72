"""The sandbox side: the code cellbox runs inside a sandbox, and the framing both sides share.

Everything here is standard library only (pyzmq too, for the agent) and keeps to Python 3.8,
since it runs with the sandbox's interpreter, which is not the daemon's.
"""
