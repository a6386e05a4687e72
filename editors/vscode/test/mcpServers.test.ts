import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ResponseError } from 'vscode-jsonrpc';
import { mcpServersOf, registeredText, registrationProblem } from '../src/mcpServers';

test('the mcpServers shape of MCP hosts becomes registerMcpServer params, in its order', () => {
  const { servers, problems } = mcpServersOf({
    time: { command: 'uvx', args: ['mcp-server-time'], env: { TZ: 'UTC' }, cwd: '/tmp' },
    docs: { type: 'http', url: 'https://example.com/mcp', headers: { Authorization: 'Bearer x' }, approval: 'never' },
    local: { type: 'stdio', command: 'mcp-local' },
  });
  assert.deepEqual(problems, []);
  assert.deepEqual(servers, [
    { name: 'time', server: { command: 'uvx', args: ['mcp-server-time'], env: { TZ: 'UTC' }, cwd: '/tmp' }, approval: 'ask' },
    { name: 'docs', server: { url: 'https://example.com/mcp', headers: { Authorization: 'Bearer x' } }, approval: 'never' },
    { name: 'local', server: { command: 'mcp-local' }, approval: 'ask' },
  ]);
  assert.deepEqual(mcpServersOf(undefined), { servers: [], problems: [] });
  assert.deepEqual(mcpServersOf({}), { servers: [], problems: [] });
});

test('a name must be a Python identifier of at most 64 characters, not a keyword', () => {
  const names = ['my-server', '2fa', 'import', 'x'.repeat(65), 'café'];
  const { servers, problems } = mcpServersOf({
    ...Object.fromEntries(names.map((name) => [name, { command: 'c' }])),
    _ok: { command: 'c' },
    match: { command: 'c' }, // a soft keyword is a fine module name
  });
  assert.deepEqual(
    servers.map((s) => s.name),
    ['_ok', 'match'],
  );
  assert.equal(problems.length, names.length);
  assert.equal(
    problems[0],
    'cellbox.mcpServers["my-server"]: the name must be a Python identifier of at most 64 characters, not a keyword, ' +
      `since the sandbox imports the server's tools as mcptools.<name>: e.g. "my_server"; not registered`,
  );
  const suggested = problems.map((p) => /e\.g\. "(\w+)"/.exec(p)?.[1]);
  assert.deepEqual(suggested, ['my_server', '_2fa', '_import', 'x'.repeat(64), 'caf_']);
  // every suggestion is a name the setting takes
  assert.deepEqual(mcpServersOf(Object.fromEntries(suggested.map((name) => [name, { command: 'c' }]))).problems, []);
});

test('an entry needs exactly one of command and url, with the fields of its kind', () => {
  const cases: [unknown, string][] = [
    ['uvx mcp-server-time', 'expected an object with "command" (a server the daemon runs) or "url" (streamable HTTP)'],
    [{}, 'needs "command" (a server the daemon runs) or "url" (streamable HTTP)'],
    [{ command: 'c', url: 'https://x' }, '"command" and "url" exclude each other: give one'],
    [{ command: '' }, '"command" must be a non-empty string'],
    [{ command: ['uvx'] }, '"command" must be a non-empty string'],
    [{ command: 'c', args: 'a b' }, '"args" must be an array of strings'],
    [{ command: 'c', args: [1] }, '"args" must be an array of strings'],
    [{ command: 'c', env: { N: 1 } }, '"env" must be an object of strings'],
    [{ command: 'c', env: ['A=1'] }, '"env" must be an object of strings'],
    [{ command: 'c', cwd: 1 }, '"cwd" must be a string'],
    [{ command: 'c', headers: { A: 'b' } }, '"headers" are for a "url" server'],
    [{ url: 'ftp://x' }, '"url" must be an http:// or https:// URL'],
    [{ url: 'https://x', args: [] }, '"args", "env" and "cwd" are for a "command" server'],
    [{ url: 'https://x', headers: 'Bearer x' }, '"headers" must be an object of strings'],
    [{ command: 'c', approval: 'always' }, '"approval" is "ask" or "never", not "always"'],
    [{ command: 'c', type: 'sse' }, '"type" "sse" is not served: "stdio", or "http" (streamable HTTP)'],
    [{ command: 'c', type: 'toString' }, '"type" "toString" is not served: "stdio", or "http" (streamable HTTP)'],
    [{ command: 'c', type: 'http' }, 'a server of "type" "http" needs "url"'],
    [
      { command: 'c', disabled: true, timeout: 5 },
      'unknown "disabled", "timeout": a server has command, args, env, cwd, or url, headers; and type, approval',
    ],
  ];
  for (const [entry, why] of cases) {
    assert.deepEqual(mcpServersOf({ s: entry }), {
      servers: [],
      problems: [`cellbox.mcpServers["s"]: ${why}; not registered`],
    });
  }
  // The others are registered all the same.
  const { servers, problems } = mcpServersOf({ bad: {}, good: { url: 'http://localhost:8000/mcp' } });
  assert.deepEqual([servers.map((s) => s.name), problems.length], [['good'], 1]);
  assert.deepEqual(mcpServersOf([{ command: 'c' }]).problems, [
    'cellbox.mcpServers must be an object of servers by name, like an MCP host\'s "mcpServers"',
  ]);
});

test('a refused registration is a problem with the server output; a registered one names its functions', () => {
  const failed = new ResponseError(1011, "MCP server 'time' (command c) exited", { log: 'boom\n' });
  assert.deepEqual(registrationProblem('time', failed), {
    kind: 'problem',
    message: `the MCP server "time" was not registered: MCP server 'time' (command c) exited`,
    log: 'boom\n',
  });
  assert.deepEqual(registrationProblem('time', new ResponseError(-32602, 'bad params')), {
    kind: 'problem',
    message: 'the MCP server "time" was not registered: bad params',
  });
  const tool = (fn: string) => ({ name: fn, function: fn, description: '' });
  const result = { name: 'time', package: 'mcptools.time', tools: [tool('get_current_time'), tool('convert_time')] };
  assert.equal(registeredText(result), '[registered mcptools.time: get_current_time, convert_time]');
  assert.equal(registeredText({ ...result, tools: [] }), '[registered mcptools.time: no tools]');
});
