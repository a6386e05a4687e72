"""cellbox's main job, end to end on the local backend: what an agent that acts by writing code does.

1. start the daemon and a sandbox with a stateful kernel,
2. hand a skill module's source to "the model" (here: print it),
3. install a package at runtime, which the running kernel imports at once,
4. run code that uses the skill and the package, streaming its output live.
"""

from cellbox import Client

SKILL = '''"""Notes kept in a small JSON database."""

from tinydb import TinyDB


def remember(path: str, text: str) -> int:
    """Stores `text` and returns how many notes there are now."""
    db = TinyDB(path)
    db.insert({"text": text})
    return len(db)
'''

with Client() as client, client.create_sandbox(env={"NOTES_OWNER": "quickstart"}) as sandbox:
    sandbox.write_file("skills/notes.py", SKILL)  # through the protocol: any backend, any engine
    print(sandbox.skill_sources(["notes"]).formatted)

    installed = sandbox.install(["tinydb"], on_progress=lambda line: None)
    print("installed:", ", ".join(f"{p.name}=={p.version}" for p in installed))

    with sandbox.start_kernel() as kernel:
        kernel.execute("import os, notes\nowner = os.environ['NOTES_OWNER']")
        code = "for word in ['cells', 'keep', 'state']:\n    print(owner, notes.remember('notes.json', word))"
        for event in kernel.stream(code):
            print(event.text, end="")  # cellbox/output notifications, as they arrive
        result = kernel.execute("len(notes.TinyDB('notes.json'))")
        print("status:", result.status, "| notes stored:", result.text.strip())
