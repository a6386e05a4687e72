// A real `cellbox serve` for the integration tests, driven over stdio by vscode-jsonrpc.

import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  createMessageConnection,
  StreamMessageReader,
  StreamMessageWriter,
  type MessageConnection,
} from 'vscode-jsonrpc/node';

const STOP_WITHIN_MS = 10_000;

/** The interpreter whose daemon the tests run: `$CELLBOX_PYTHON`, else python3. */
export const PYTHON = process.env.CELLBOX_PYTHON || 'python3';

export interface Daemon {
  connection: MessageConnection;
  initializeResult: unknown;
  /** A folder of the test's own, removed when the daemon stops. */
  home: string;
}

/**
 * Starts a daemon (`$CELLBOX_PYTHON -m cellboxd serve`, else python3) with its state in a fresh
 * folder, initializes it, runs `body`, then stops it: shutdown + exit, killed if it lingers.
 * A daemon that did not exit 0 after shutdown + exit fails the test.
 */
export async function withDaemon(body: (daemon: Daemon) => Promise<void>): Promise<void> {
  const home = mkdtempSync(join(tmpdir(), 'cellbox-vscode-'));
  const env = {
    ...process.env,
    CELLBOX_DATA_DIR: join(home, 'data'),
    CELLBOX_CACHE_DIR: join(home, 'cache'),
    CELLBOX_LOG_DIR: join(home, 'log'),
    CELLBOX_CONFIG: join(home, 'config.toml'),
  };
  const proc = spawn(PYTHON, ['-m', 'cellboxd', 'serve'], { env, stdio: 'pipe' });
  let stderr = '';
  proc.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const connection = createMessageConnection(new StreamMessageReader(proc.stdout), new StreamMessageWriter(proc.stdin));
  connection.listen();
  let passed = false;
  try {
    const initializeResult = await connection.sendRequest('initialize', {
      processId: process.pid,
      rootUri: null,
      capabilities: {},
      clientInfo: { name: 'cellbox-vscode-tests' },
    });
    await connection.sendNotification('initialized', {});
    await body({ connection, initializeResult, home });
    passed = true;
  } catch (error) {
    // The daemon's log says why a request failed.
    if (stderr) console.error(`daemon stderr:\n${stderr}`);
    throw error;
  } finally {
    const code = await stop(proc, connection, exited);
    connection.dispose();
    rmSync(home, { recursive: true, force: true });
    if (passed) assert.equal(code, 0, `the daemon exited ${code} after shutdown + exit:\n${stderr}`);
  }
}

async function stop(
  proc: ChildProcessWithoutNullStreams,
  connection: MessageConnection,
  exited: Promise<number | null>,
): Promise<number | null> {
  if (proc.exitCode !== null) return proc.exitCode;
  try {
    await within(connection.sendRequest('shutdown'), STOP_WITHIN_MS);
    await connection.sendNotification('exit');
  } catch {
    // A daemon that does not answer is killed below.
  }
  const code = await within(exited, STOP_WITHIN_MS).catch(() => undefined);
  if (code !== undefined) return code;
  proc.kill('SIGKILL');
  await exited;
  return null;
}

function within<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
