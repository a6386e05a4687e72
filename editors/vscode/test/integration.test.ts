// The extension's Session against the real daemon, over stdio through vscode-jsonrpc, as the
// LanguageClient drives it in VS Code. Each test starts and stops its own daemon.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { ALLOW, ToolCallApprover, type ApprovalChoice, type ApprovalPrompt } from '../src/approval';
import { findCells } from '../src/cells';
import type { McpServerEvent } from '../src/mcpServers';
import { cellLabel, imagesHtml, Transcript, type ImageView } from '../src/messages';
import {
  ClientRequests,
  Methods,
  type ApproveToolCallParams,
  type DisplayNotification,
  type OutputNotification,
  type WorkDoneProgress,
  type WriteFileParams,
} from '../src/protocol';
import { cellboxCapabilities, Session } from '../src/session';
import { PYTHON, withDaemon } from './daemon';

const TIMEOUT = { timeout: 180_000 };
// the PyPI server `mcp-server-time`, run by the daemon's own interpreter
const TIME_SERVER = { command: PYTHON, args: ['-m', 'mcp_server_time', '--local-timezone', 'UTC'] };
const TIME_CALL = 'from mcptools.time.get_current_time import get_current_time\nget_current_time(timezone="UTC")';
const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==';

interface CompletionItem {
  label: string;
  textEdit?: { range: unknown; newText: string };
}

test('initialize advertises cellbox, completion on "." and hover', TIMEOUT, () =>
  withDaemon(async ({ initializeResult }) => {
    const cellbox = cellboxCapabilities(initializeResult);
    assert.equal(cellbox?.protocolVersion, 1);
    assert.ok(cellbox?.backends.includes('local'));
    const { capabilities } = initializeResult as {
      capabilities: { completionProvider?: { triggerCharacters?: string[] }; hoverProvider?: unknown };
    };
    assert.deepEqual(capabilities.completionProvider?.triggerCharacters, ['.']);
    assert.ok(capabilities.hoverProvider);
  }),
);

test('output streams live and in order, before the result', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local', timeout: 60 }));
    const creating: WorkDoneProgress[] = [];
    const { sandbox } = await session.start((value) => creating.push(value));
    assert.equal(sandbox.backend, 'local');
    assert.deepEqual([creating[0].kind, creating.at(-1)?.kind], ['begin', 'end']);

    const events: { what: string; at: number }[] = [];
    const code = [
      'import sys, time',
      'for i in range(3):',
      '    print(f"line {i}", flush=True)',
      '    time.sleep(0.3)',
      'print("careful", file=sys.stderr, flush=True)',
      '"done"',
    ].join('\n');
    const result = await session.execute(code, {
      onOutput: (n: OutputNotification) => events.push({ what: `${n.stream}: ${n.text}`, at: Date.now() }),
      onDisplay: (n: DisplayNotification) => events.push({ what: `display: ${String(n.data['text/plain'])}`, at: Date.now() }),
    });
    const resultAt = Date.now();
    assert.equal(result.status, 'ok');
    assert.equal(result.text, "line 0\nline 1\nline 2\ncareful\n'done'\n");
    const stdout = events.filter((e) => e.what.startsWith('stdout: ')).map((e) => e.what.slice(8));
    assert.equal(stdout.join(''), 'line 0\nline 1\nline 2\n');
    assert.deepEqual(
      events.filter((e) => !e.what.startsWith('stdout: ')).map((e) => e.what),
      ['stderr: careful\n', "display: 'done'"],
    );
    // Live: the first line arrived while the cell still slept, not with the result.
    assert.ok(resultAt - events[0].at >= 500, `first output ${resultAt - events[0].at} ms before the result`);
  }),
);

test('two cells through the Output channel transcript: a value, then an error with its traceback', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local' }));
    const cells = findCells("# %% Greeting\nprint('hello')\n6 * 7\n\n# %%\n1/0\n");
    let channel = '';
    const results = [];
    for (const cell of cells) {
      const transcript = new Transcript((text) => (channel += text));
      transcript.begin(cellLabel('demo.py', cell));
      const result = await session.execute(cell.code, {
        onOutput: (n) => transcript.output(n),
        onDisplay: (n) => transcript.display(n),
      });
      transcript.end(result);
      results.push(result);
    }
    const [ok, error] = results;
    assert.equal(ok.status, 'ok');
    assert.equal(error.status, 'error');
    assert.equal(error.executionCount, 2);
    assert.equal(error.error?.ename, 'ZeroDivisionError');
    assert.equal(error.error?.evalue, 'division by zero');
    assert.equal(error.error?.traceback.at(-1), 'ZeroDivisionError: division by zero');
    assert.ok(error.error?.traceback.some((chunk) => chunk.includes('1/0')));
    const [first, second] = channel.split(/(?=^>>> )/m);
    assert.equal(first, '>>> demo.py: cell 1 "Greeting" (lines 1-4)\nhello\n42\n✓ [1] ok\n');
    assert.match(second, /^>>> demo\.py: cell 2 \(lines 5-7\)\n-+\nZeroDivisionError +Traceback/);
    assert.match(second, /----> 1 1\/0\n[\s\S]*\nZeroDivisionError: division by zero\n✗ \[2\] error: ZeroDivisionError: division by zero\n$/);
  }),
);

test('an image display becomes a panel image, with the file the daemon saved', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local' }));
    const { sandbox, kernelId } = await session.start();
    let channel = '';
    const transcript = new Transcript((text) => (channel += text));
    const images: ImageView[] = [];
    const result = await session.execute(
      `from base64 import b64decode\nfrom IPython.display import Image, display\ndisplay(Image(data=b64decode("${PNG}")))`,
      {
        onDisplay: (n) => {
          const image = transcript.display(n);
          if (image) images.push(image);
        },
      },
    );
    assert.equal(result.status, 'ok', JSON.stringify(result.error));
    assert.equal(images.length, 1);
    const [image] = images;
    assert.deepEqual([image.mime, image.base64], ['image/png', PNG]);
    // named by the kernel in the workspace's images/, never by the client's executionId
    assert.match(image.file ?? '', new RegExp(`^images/${kernelId}-\\d+\\.png$`));
    assert.equal(image.path, join(sandbox.workspace!, image.file!));
    assert.deepEqual(readFileSync(image.path!), Buffer.from(PNG, 'base64'));
    assert.equal(channel, `[image/png] ${image.path}\n`);
    assert.ok(imagesHtml(images).includes(`src="data:image/png;base64,${PNG}"`));
  }),
);

test('interrupt cancels the running execution and the queued one; the kernel goes on', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local' }));
    await session.start();
    let started: () => void = () => undefined;
    const sleeping = new Promise<void>((resolve) => (started = resolve));
    const outputs: Record<string, string> = { sleeper: '', queued: '' };
    const sleeper = session.execute('print("asleep", flush=True)\nimport time\ntime.sleep(60)', {
      onOutput: (n) => {
        outputs.sleeper += n.text;
        started();
      },
    });
    const queued = session.execute('print("queued ran")', { onOutput: (n) => (outputs.queued += n.text) });
    await sleeping;
    await session.interrupt();
    const [a, b] = await Promise.all([sleeper, queued]);
    assert.deepEqual([a.status, a.text, outputs.sleeper], ['cancelled', 'asleep\n', 'asleep\n']);
    assert.equal(b.status, 'cancelled');
    assert.equal(outputs.queued, '');
    const after = await session.execute('print("still here")');
    assert.deepEqual([after.status, after.text], ['ok', 'still here\n']);
  }),
);

test('install cowsay==6.1 with progress; the kernel imports it at once', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local' }));
    const progress: WorkDoneProgress[] = [];
    const { installed } = await session.install(['cowsay==6.1'], (value) => progress.push(value));
    assert.deepEqual(installed, [{ name: 'cowsay', version: '6.1' }]);
    assert.equal(progress[0].kind, 'begin');
    assert.match(progress[0].title ?? '', /cowsay==6\.1/);
    assert.ok(progress.some((p) => p.kind === 'report' && p.message), 'no progress messages');
    assert.deepEqual(progress.at(-1), { kind: 'end', message: 'done' });
    const result = await session.execute('import cowsay\ncowsay.cow("moo")');
    assert.equal(result.status, 'ok', JSON.stringify(result.error));
    assert.match(result.text, /moo/);
  }),
);

test('skill sources of a module in the workspace skills/ folder', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local' }));
    const { sandbox } = await session.start();
    const source = 'def greet(name):\n    """Greets someone."""\n    return f"hello {name}"\n';
    // through the protocol, as on a backend whose workspace this machine cannot see
    const file: WriteFileParams = {
      sandboxId: sandbox.sandboxId,
      path: 'skills/greetings.py',
      content: Buffer.from(source).toString('base64'),
    };
    await connection.sendRequest(Methods.writeFile, file);
    const { sources, formatted } = await session.skillSources(['greetings']);
    assert.deepEqual(sources, { greetings: source });
    assert.ok(formatted.includes(source), formatted);
    assert.match(formatted, /greetings/);
  }),
);

test('completion and hover of a name an earlier cell defined, in a bound document', TIMEOUT, () =>
  withDaemon(async ({ connection, home }) => {
    const session = new Session(connection, () => ({ backend: 'local' }));
    assert.equal((await session.execute('my_variable_xyz = 42')).status, 'ok');
    const uri = pathToFileURL(join(home, 'demo.py')).href;
    const textDocument = { uri, version: 1 };
    await connection.sendNotification('textDocument/didOpen', {
      textDocument: { ...textDocument, languageId: 'python', text: 'x = 1\n' },
    });
    // Incremental sync, as the daemon asks for (textDocumentSync.change 2).
    await connection.sendNotification('textDocument/didChange', {
      textDocument: { uri, version: 2 },
      contentChanges: [{ range: { start: { line: 1, character: 0 }, end: { line: 1, character: 0 } }, text: 'my_vari' }],
    });
    await session.bind(uri);
    const completion = await connection.sendRequest<{ items: CompletionItem[] } | CompletionItem[]>(
      'textDocument/completion',
      { textDocument: { uri }, position: { line: 1, character: 7 } },
    );
    const items = Array.isArray(completion) ? completion : completion.items;
    const item = items.find((i) => i.label === 'my_variable_xyz');
    assert.ok(item, `no my_variable_xyz among ${JSON.stringify(items.map((i) => i.label))}`);
    assert.deepEqual(item.textEdit, {
      range: { start: { line: 1, character: 0 }, end: { line: 1, character: 7 } },
      newText: 'my_variable_xyz',
    });

    await connection.sendNotification('textDocument/didChange', {
      textDocument: { uri, version: 3 },
      contentChanges: [{ range: { start: { line: 1, character: 7 }, end: { line: 1, character: 7 } }, text: 'able_xyz' }],
    });
    const hover = await connection.sendRequest<{ contents: { kind: string; value: string } } | null>(
      'textDocument/hover',
      { textDocument: { uri }, position: { line: 1, character: 3 } },
    );
    assert.ok(hover, 'no hover');
    assert.match(hover.contents.value, /int/);
    await connection.sendNotification('textDocument/didClose', { textDocument: { uri } });
  }),
);

test('a cell calls an MCP tool once the user allows it; dismissed, the cell raises ToolCallRejected', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const session = new Session(connection, () => ({ backend: 'local', timeout: 60, mcpServers: { time: TIME_SERVER } }));
    const answers: (ApprovalChoice | undefined)[] = [ALLOW, undefined];
    const prompts: ApprovalPrompt[] = [];
    const requests: ApproveToolCallParams[] = [];
    const approver = new ToolCallApprover(
      () => 'ask',
      async (prompt) => {
        prompts.push(prompt);
        return answers.shift();
      },
    );
    // as extension.ts wires it to the LanguageClient
    connection.onRequest(ClientRequests.approveToolCall, (params: ApproveToolCallParams) => {
      requests.push(params);
      return approver.approve(params);
    });
    const { sandbox, kernelId } = await session.start();
    const allowed = await session.execute(TIME_CALL);
    assert.equal(allowed.status, 'ok', JSON.stringify(allowed.error));
    assert.match(allowed.text, /^\{'timezone': 'UTC',\s+'datetime': '\d{4}-/);
    const dismissed = await session.execute(TIME_CALL);
    assert.equal(dismissed.status, 'error');
    assert.equal(dismissed.error?.ename, 'ToolCallRejected', JSON.stringify(dismissed.error));

    assert.deepEqual(
      requests.map((r) => [r.sandboxId, r.kernelId, r.executionId, r.server, r.tool, r.arguments]),
      [allowed, dismissed].map((r) => [sandbox.sandboxId, kernelId, r.executionId, 'time', 'get_current_time', { timezone: 'UTC' }]),
    );
    assert.equal(prompts.length, 2);
    assert.match(prompts[0].message, /"get_current_time" of the MCP server "time"/);
    assert.equal(prompts[0].detail, 'Arguments:\n  "timezone": "UTC"');
  }),
);

test('cellbox.mcpServers: each new sandbox registers them; a broken or misnamed one is reported, the rest work', TIMEOUT, () =>
  withDaemon(async ({ connection }) => {
    const mcpServers = {
      time: { ...TIME_SERVER, approval: 'never' },
      broken: { command: PYTHON, args: ['-c', 'import sys; sys.exit("no MCP here")'] },
      'my-server': { command: PYTHON },
    };
    const session = new Session(connection, () => ({ backend: 'local', timeout: 60, mcpServers }));
    const events: McpServerEvent[] = [];
    session.onMcpServer((event) => events.push(event));
    // no approveToolCall handler: a call that asked would be refused
    const check = async (): Promise<void> => {
      const result = await session.execute(TIME_CALL);
      assert.equal(result.status, 'ok', JSON.stringify(result.error));
      assert.match(result.text, /^\{'timezone': 'UTC',\s+'datetime': '\d{4}-/);
      const registered = events.flatMap((e) => (e.kind === 'registered' ? [e.result] : []));
      assert.deepEqual(registered.map((r) => r.package), ['mcptools.time']);
      assert.ok(registered[0].tools.some((tool) => tool.function === 'get_current_time'), JSON.stringify(registered));
      const problems = events.flatMap((e) => (e.kind === 'problem' ? [e] : []));
      assert.equal(problems.length, 2, JSON.stringify(problems));
      assert.match(problems[0].message, /^cellbox\.mcpServers\["my-server"\]: the name must be .* "my_server"; not registered$/);
      assert.match(problems[1].message, /^the MCP server "broken" was not registered: /);
      assert.match(problems[1].log ?? '', /no MCP here/);
    };
    await check();
    // as on a change of backend: a new sandbox, registered afresh
    const first = session.current?.sandbox.sandboxId;
    await session.reset();
    events.length = 0;
    await check();
    assert.notEqual(session.current?.sandbox.sandboxId, first);
  }),
);
