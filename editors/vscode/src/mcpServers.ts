// The `cellbox.mcpServers` setting, in the `mcpServers` shape of MCP hosts, checked and turned into
// `cellbox/registerMcpServer` params. No VS Code here: session.ts registers the servers in each
// new sandbox, extension.ts reports what went wrong.

import { describeError } from './messages';
import type { McpApproval, McpServerSpec, RegisterMcpServerResult } from './protocol';

/** A server of the setting, ready to be registered. */
export interface McpServerConfig {
  name: string;
  server: McpServerSpec;
  approval: McpApproval;
}

/** What a new sandbox's servers came to, as the user is told: registered, or a problem. */
export type McpServerEvent =
  | { kind: 'registered'; result: RegisterMcpServerResult }
  | { kind: 'problem'; message: string; log?: string };

export const SETTING = 'cellbox.mcpServers';

// The sandbox imports a server's tools as `mcptools.<name>`: the daemon's names, keywords excluded.
const NAME = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;
const KEYWORDS = new Set(
  [
    'False None True and as assert async await break class continue def del elif else except finally for from',
    'global if import in is lambda nonlocal not or pass raise return try while with yield',
  ]
    .join(' ')
    .split(' '),
);
// MCP hosts' optional `type` of a server, and the field that server needs.
const TRANSPORTS = new Map<unknown, 'command' | 'url'>([
  ['stdio', 'command'],
  ['http', 'url'],
  ['streamable-http', 'url'],
]);
const FIELDS = new Set(['command', 'args', 'env', 'cwd', 'url', 'headers', 'type', 'approval']);

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isApproval(value: unknown): value is McpApproval {
  return value === 'ask' || value === 'never';
}

function isStrings(value: unknown): value is string[] {
  return Array.isArray(value) && value.every((item) => typeof item === 'string');
}

function isStringMap(value: unknown): value is Record<string, string> {
  return isObject(value) && Object.values(value).every((item) => typeof item === 'string');
}

/** `fields` without the undefined ones, as JSON sends them. */
function defined<T extends object>(fields: T): T {
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined)) as T;
}

/** A valid name close to `name`, for the message that refuses it. */
function suggestName(name: string): string {
  let suggestion = name.trim().replace(/\W/g, '_') || 'server';
  if (/^\d/.test(suggestion) || KEYWORDS.has(suggestion)) suggestion = `_${suggestion}`;
  return suggestion.slice(0, 64);
}

/** The server of one entry, or why it cannot be registered. */
function entryOf(name: string, entry: unknown): McpServerConfig | string {
  if (!NAME.test(name) || KEYWORDS.has(name)) {
    return (
      'the name must be a Python identifier of at most 64 characters, not a keyword, since the sandbox ' +
      `imports the server's tools as mcptools.<name>: e.g. ${JSON.stringify(suggestName(name))}`
    );
  }
  if (!isObject(entry)) {
    return 'expected an object with "command" (a server the daemon runs) or "url" (streamable HTTP)';
  }
  const extra = Object.keys(entry).filter((field) => !FIELDS.has(field));
  if (extra.length > 0) {
    const names = extra.map((field) => JSON.stringify(field)).join(', ');
    return `unknown ${names}: a server has command, args, env, cwd, or url, headers; and type, approval`;
  }
  const { command, args, env, cwd, url, headers, type, approval = 'ask' } = entry;
  if (!isApproval(approval)) {
    return `"approval" is "ask" or "never", not ${JSON.stringify(approval)}`;
  }
  const transport = TRANSPORTS.get(type);
  if (type !== undefined && transport === undefined) {
    return `"type" ${JSON.stringify(type)} is not served: "stdio", or "http" (streamable HTTP)`;
  }
  if (command === undefined && url === undefined) {
    return 'needs "command" (a server the daemon runs) or "url" (streamable HTTP)';
  }
  if (command !== undefined && url !== undefined) return '"command" and "url" exclude each other: give one';
  if (transport !== undefined && entry[transport] === undefined) {
    return `a server of "type" ${JSON.stringify(type)} needs "${transport}"`;
  }
  if (command !== undefined) {
    if (typeof command !== 'string' || command === '') return '"command" must be a non-empty string';
    if (headers !== undefined) return '"headers" are for a "url" server';
    if (args !== undefined && !isStrings(args)) return '"args" must be an array of strings';
    if (env !== undefined && !isStringMap(env)) return '"env" must be an object of strings';
    if (cwd !== undefined && typeof cwd !== 'string') return '"cwd" must be a string';
    return defined({ name, server: defined({ command, args, env, cwd }), approval });
  }
  if (typeof url !== 'string' || !/^https?:\/\//.test(url)) return '"url" must be an http:// or https:// URL';
  if (args !== undefined || env !== undefined || cwd !== undefined) {
    return '"args", "env" and "cwd" are for a "command" server';
  }
  if (headers !== undefined && !isStringMap(headers)) return '"headers" must be an object of strings';
  return defined({ name, server: defined({ url, headers }), approval });
}

/** The servers of the setting's value, in its order, and a message for each entry left out. */
export function mcpServersOf(setting: unknown): { servers: McpServerConfig[]; problems: string[] } {
  const servers: McpServerConfig[] = [];
  const problems: string[] = [];
  if (setting === undefined || setting === null) return { servers, problems };
  if (!isObject(setting)) {
    problems.push(`${SETTING} must be an object of servers by name, like an MCP host's "mcpServers"`);
    return { servers, problems };
  }
  for (const [name, entry] of Object.entries(setting)) {
    const server = entryOf(name, entry);
    if (typeof server === 'string') {
      problems.push(`${SETTING}[${JSON.stringify(name)}]: ${server}; not registered`);
    } else {
      servers.push(server);
    }
  }
  return { servers, problems };
}

/** A registration that the daemon refused: McpServerFailed (1011) carries the server's output. */
export function registrationProblem(name: string, error: unknown): McpServerEvent {
  const { message, ...log } = describeError(error);
  return { kind: 'problem', message: `the MCP server ${JSON.stringify(name)} was not registered: ${message}`, ...log };
}

/** The Output channel's line for a registered server: its package and its tools' functions. */
export function registeredText({ package: pkg, tools }: RegisterMcpServerResult): string {
  const functions = tools.map((tool) => tool.function).join(', ') || 'no tools';
  return `[registered ${pkg}: ${functions}]`;
}
