// Session against a scripted connection: what it sends (checked against protocol/schema.json)
// and how it routes what comes back. test/integration.test.ts drives the real daemon.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { test } from 'node:test';
import { ResponseError, type CancellationToken, type ProgressType } from 'vscode-jsonrpc';
import type { McpServerEvent } from '../src/mcpServers';
import type { ExecuteResult, ProgressToken, WorkDoneProgress } from '../src/protocol';
import { Session, cellboxCapabilities, type Connection, type Disposable } from '../src/session';

interface SchemaObject {
  properties?: Record<string, unknown>;
  required?: string[];
  $ref?: string;
}

interface Schema {
  requests: Record<string, { params: SchemaObject }>;
  notifications: Record<string, SchemaObject>;
  $defs: Record<string, SchemaObject>;
}

// out/test/ -> editors/vscode/ -> the repository
const schema = JSON.parse(readFileSync(resolve(__dirname, '../../../../protocol/schema.json'), 'utf8')) as Schema;

function definition(ref: SchemaObject): SchemaObject {
  return ref.$ref ? schema.$defs[ref.$ref.replace('#/$defs/', '')] : ref;
}

/** Fails a request whose method or params the schema does not know. */
function checkAgainstSchema(method: string, params: unknown): void {
  const request = schema.requests[method];
  assert.ok(request, `${method} is not in protocol/schema.json`);
  const def = definition(request.params);
  const keys = Object.keys(params as object);
  for (const key of keys) assert.ok(def.properties && key in def.properties, `${method} has no param ${key}`);
  for (const key of def.required ?? []) assert.ok(keys.includes(key), `${method} needs ${key}`);
}

type Responder = (method: string, params: Record<string, unknown>, token?: CancellationToken) => Promise<unknown>;

class FakeConnection implements Connection {
  readonly sent: { method: string; params: Record<string, unknown> }[] = [];
  private readonly notificationHandlers = new Map<string, (params: never) => void>();
  readonly progressHandlers = new Map<ProgressToken, (value: WorkDoneProgress) => void>();

  constructor(private readonly respond: Responder) {}

  async sendRequest<R>(method: string, params: unknown, token?: CancellationToken): Promise<R> {
    // JSON on the wire drops undefined fields.
    const wire = JSON.parse(JSON.stringify(params)) as Record<string, unknown>;
    checkAgainstSchema(method, wire);
    this.sent.push({ method, params: wire });
    return (await this.respond(method, wire, token)) as R;
  }

  onNotification<P>(method: string, handler: (params: P) => void): Disposable {
    assert.ok(method in schema.notifications, `${method} is not in protocol/schema.json`);
    this.notificationHandlers.set(method, handler as (params: never) => void);
    return { dispose: () => this.notificationHandlers.delete(method) };
  }

  onProgress<P>(_type: ProgressType<P>, token: ProgressToken, handler: (value: P) => void): Disposable {
    this.progressHandlers.set(token, handler as (value: WorkDoneProgress) => void);
    return { dispose: () => this.progressHandlers.delete(token) };
  }

  notify(method: string, params: object): void {
    (this.notificationHandlers.get(method) as ((params: object) => void) | undefined)?.(params);
  }
}

const sandbox = { sandboxId: 'sb-1', backend: 'local', workspace: '/w' };

function result(executionId: string, status: ExecuteResult['status'] = 'ok', text = ''): ExecuteResult {
  return { executionId, status, text, outputs: [], truncated: false };
}

/** Answers the lifecycle requests; `execute` is left to the test. */
function daemonLike(execute: Responder = async (_m, p) => result(String(p.executionId))): Responder {
  return async (method, params, token) => {
    switch (method) {
      case 'cellbox/createSandbox':
        return sandbox;
      case 'cellbox/startKernel':
        return { kernelId: 'k-1', sandboxId: params.sandboxId };
      case 'cellbox/execute':
        return execute(method, params, token);
      default:
        return null;
    }
  };
}

test('one sandbox and kernel for concurrent first uses; image only for docker', async () => {
  const connection = new FakeConnection(daemonLike());
  const session = new Session(connection, () => ({ backend: 'local', image: 'basic', timeout: 30 }));
  const [a, b] = await Promise.all([session.start(), session.start()]);
  assert.equal(a, b);
  await session.execute('1');
  assert.deepEqual(
    connection.sent.map((r) => r.method),
    ['cellbox/createSandbox', 'cellbox/startKernel', 'cellbox/execute'],
  );
  assert.deepEqual(connection.sent[0].params, { backend: 'local' });
  assert.deepEqual(connection.sent[2].params, { kernelId: 'k-1', code: '1', executionId: 'cell-1', timeout: 30 });

  const docker = new FakeConnection(daemonLike());
  await new Session(docker, () => ({ backend: 'docker', image: 'basic' })).start();
  assert.deepEqual(docker.sent[0].params, { backend: 'docker', image: 'basic' });
});

test('a failed start is tried again on the next use', async () => {
  let fail = true;
  const connection = new FakeConnection(async (method, params, token) => {
    if (method === 'cellbox/createSandbox' && fail) throw new ResponseError(1003, 'docker is not running');
    return daemonLike()(method, params, token);
  });
  const session = new Session(connection, () => ({}));
  await assert.rejects(session.start(), /docker is not running/);
  fail = false;
  assert.equal((await session.start()).kernelId, 'k-1');
});

test('a sandbox whose kernel did not start is destroyed', async () => {
  const connection = new FakeConnection(async (method, params, token) => {
    if (method === 'cellbox/startKernel') throw new ResponseError(1003, 'no kernel for you');
    return daemonLike()(method, params, token);
  });
  await assert.rejects(new Session(connection, () => ({})).start(), /no kernel for you/);
  assert.deepEqual(connection.sent.at(-1), { method: 'cellbox/destroySandbox', params: { sandboxId: 'sb-1' } });
});

test('a reset while the kernel starts removes that kernel; the next use makes a new one', async () => {
  let release: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const connection = new FakeConnection(async (method, params, token) => {
    if (method === 'cellbox/startKernel') await gate;
    return daemonLike()(method, params, token);
  });
  const session = new Session(connection, () => ({}));
  const first = session.start();
  await new Promise((r) => setImmediate(r));
  const reset = session.reset();
  release();
  await Promise.all([first, reset]);
  assert.equal(session.current, undefined);
  const second = await session.start();
  assert.deepEqual(
    connection.sent.map((r) => r.method),
    ['cellbox/createSandbox', 'cellbox/startKernel', 'cellbox/destroySandbox', 'cellbox/createSandbox', 'cellbox/startKernel'],
  );
  assert.equal(second, await session.start());
});

test('output and displays reach the execution they belong to, before its result', async () => {
  const events: string[] = [];
  const connection: FakeConnection = new FakeConnection(
    daemonLike(async (_m, params) => {
      const executionId = String(params.executionId);
      const other = executionId === 'cell-1' ? 'cell-2' : 'cell-1';
      connection.notify('cellbox/output', { executionId, kernelId: 'k-1', stream: 'stdout', text: `${executionId}\n` });
      connection.notify('cellbox/output', { executionId: other, kernelId: 'k-1', stream: 'stdout', text: 'not mine\n' });
      connection.notify('cellbox/display', { executionId, kernelId: 'k-1', data: { 'text/plain': '1' }, metadata: {} });
      return result(executionId);
    }),
  );
  const session = new Session(connection, () => ({}));
  const run = async (code: string): Promise<void> => {
    const { executionId } = await session.execute(code, {
      onOutput: (n) => events.push(`${code} output ${n.text.trim()}`),
      onDisplay: (n) => events.push(`${code} display ${n.executionId}`),
    });
    events.push(`${code} result ${executionId}`);
  };
  await run('a');
  await run('b');
  assert.deepEqual(events, [
    'a output cell-1',
    'a display cell-1',
    'a result cell-1',
    'b output cell-2',
    'b display cell-2',
    'b result cell-2',
  ]);
});

test('interrupt cancels what runs and answers the partial results', async () => {
  const connection = new FakeConnection(
    daemonLike(
      (_m, params, token) =>
        new Promise((_resolve, reject) => {
          token?.onCancellationRequested(() => {
            const partial = result(String(params.executionId), 'cancelled', 'so far\n');
            reject(new ResponseError(-32800, 'cancelled', { result: partial }));
          });
        }),
    ),
  );
  const session = new Session(connection, () => ({}));
  await session.start();
  const running = [session.execute('sleep'), session.execute('queued')];
  await new Promise((r) => setImmediate(r));
  await session.interrupt();
  const results = await Promise.all(running);
  assert.deepEqual(
    results.map((r) => [r.executionId, r.status, r.text]),
    [
      ['cell-1', 'cancelled', 'so far\n'],
      ['cell-2', 'cancelled', 'so far\n'],
    ],
  );
  // With nothing running, interrupt asks the daemon to interrupt the kernel.
  await session.interrupt();
  assert.deepEqual(connection.sent.at(-1), { method: 'cellbox/interruptKernel', params: { kernelId: 'k-1' } });
});

test('other errors of execute are thrown', async () => {
  const connection = new FakeConnection(
    daemonLike(async () => {
      throw new ResponseError(1007, 'kernel k-1 died');
    }),
  );
  await assert.rejects(new Session(connection, () => ({})).execute('1'), /died/);
});

test('install reports $/progress of its own token, then stops listening', async () => {
  const connection: FakeConnection = new FakeConnection(async (method, params, token) => {
    if (method !== 'cellbox/installPackage') return daemonLike()(method, params, token);
    const report = connection.progressHandlers.get(params.workDoneToken as string);
    report?.({ kind: 'begin', title: 'Installing cowsay' });
    report?.({ kind: 'end', message: 'done' });
    return { installed: [{ name: 'cowsay', version: '6.1' }] };
  });
  const session = new Session(connection, () => ({}));
  const progress: WorkDoneProgress[] = [];
  const { installed } = await session.install(['cowsay'], (value) => progress.push(value));
  assert.deepEqual(installed, [{ name: 'cowsay', version: '6.1' }]);
  assert.deepEqual(progress.map((p) => p.kind), ['begin', 'end']);
  assert.equal(connection.progressHandlers.size, 0);
  const install = connection.sent.find((r) => r.method === 'cellbox/installPackage');
  assert.deepEqual(install?.params, { sandboxId: 'sb-1', packages: ['cowsay'], workDoneToken: 'cellbox-progress-1' });
});

test('kernel status of this session only; bind once per kernel; reset destroys the sandbox', async () => {
  const connection = new FakeConnection(daemonLike());
  const session = new Session(connection, () => ({}));
  const states: string[] = [];
  session.onKernelStatus((state) => states.push(state));
  connection.notify('cellbox/kernelStatus', { kernelId: 'k-0', state: 'idle' }); // no kernel of ours yet
  const starting = session.start();
  connection.notify('cellbox/kernelStatus', { kernelId: 'k-1', state: 'starting' }); // id not known yet
  await starting;
  connection.notify('cellbox/kernelStatus', { kernelId: 'k-1', state: 'busy' });
  connection.notify('cellbox/kernelStatus', { kernelId: 'k-9', state: 'dead' });
  assert.deepEqual(states, ['starting', 'busy']);

  await session.bind('file:///demo.py');
  await session.bind('file:///demo.py');
  await session.reset();
  assert.equal(session.current, undefined);
  connection.notify('cellbox/kernelStatus', { kernelId: 'k-1', state: 'dead' }); // the old kernel
  assert.deepEqual(states, ['starting', 'busy']);
  await session.bind('file:///demo.py');
  assert.deepEqual(
    connection.sent.map((r) => r.method).filter((m) => m !== 'cellbox/createSandbox' && m !== 'cellbox/startKernel'),
    ['cellbox/bindDocument', 'cellbox/destroySandbox', 'cellbox/bindDocument'],
  );
});

test('each new sandbox gets the configured MCP servers before the first cell; one left out is reported', async () => {
  const connection = new FakeConnection(async (method, params, token) => {
    if (method !== 'cellbox/registerMcpServer') return daemonLike()(method, params, token);
    if (params.name === 'broken') throw new ResponseError(1011, "MCP server 'broken' exited", { log: 'no MCP here\n' });
    return { name: params.name, package: `mcptools.${String(params.name)}`, tools: [] };
  });
  const mcpServers = {
    time: { command: 'python3', args: ['-m', 'mcp_server_time'] },
    'bad-name': { command: 'c' },
    broken: { command: 'false' },
    docs: { url: 'https://example.com/mcp', approval: 'never' },
  };
  const session = new Session(connection, () => ({ mcpServers }));
  const events: McpServerEvent[] = [];
  session.onMcpServer((event) => events.push(event));
  await session.execute('1');
  const registrations = () => connection.sent.filter((r) => r.method === 'cellbox/registerMcpServer');
  assert.deepEqual(
    registrations().map((r) => r.params),
    [
      { sandboxId: 'sb-1', name: 'time', server: mcpServers.time, approval: 'ask' },
      { sandboxId: 'sb-1', name: 'broken', server: { command: 'false' }, approval: 'ask' },
      { sandboxId: 'sb-1', name: 'docs', server: { url: 'https://example.com/mcp' }, approval: 'never' },
    ],
  );
  assert.deepEqual(
    connection.sent.map((r) => r.method).filter((m) => m !== 'cellbox/registerMcpServer'),
    ['cellbox/createSandbox', 'cellbox/startKernel', 'cellbox/execute'],
  );
  assert.deepEqual(
    events.map((e) => (e.kind === 'registered' ? e.result.package : [e.message.split(':')[0], e.log])),
    [
      ['cellbox.mcpServers["bad-name"]', undefined],
      'mcptools.time',
      ['the MCP server "broken" was not registered', 'no MCP here\n'],
      'mcptools.docs',
    ],
  );

  // A new sandbox, after a reset, gets them again.
  await session.reset();
  await session.start();
  assert.deepEqual(
    registrations()
      .slice(3)
      .map((r) => r.params.name),
    ['time', 'broken', 'docs'],
  );
});

test('a sandbox whose kernel did not start is destroyed once its MCP servers answered', async () => {
  let release: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const connection = new FakeConnection(async (method, params, token) => {
    if (method === 'cellbox/startKernel') throw new ResponseError(1003, 'no kernel for you');
    if (method === 'cellbox/registerMcpServer') {
      await gate;
      return { name: params.name, package: 'mcptools.time', tools: [] };
    }
    return daemonLike()(method, params, token);
  });
  const starting = new Session(connection, () => ({ mcpServers: { time: { command: 'c' } } })).start();
  await new Promise((r) => setImmediate(r));
  // the kernel failed at once; its sandbox waits for the server's answer
  assert.equal(connection.sent.at(-1)?.method, 'cellbox/registerMcpServer');
  release();
  await assert.rejects(starting, /no kernel for you/);
  assert.deepEqual(connection.sent.at(-1), { method: 'cellbox/destroySandbox', params: { sandboxId: 'sb-1' } });
});

test('cellboxCapabilities reads capabilities.experimental.cellbox', () => {
  const cellbox = { protocolVersion: 1, backends: ['local'], defaultBackend: 'local' };
  assert.deepEqual(cellboxCapabilities({ capabilities: { experimental: { cellbox } } }), cellbox);
  assert.equal(cellboxCapabilities({ capabilities: {} }), undefined);
  assert.equal(cellboxCapabilities(undefined), undefined);
});
