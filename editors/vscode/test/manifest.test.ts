// package.json against src/extension.ts, which cannot load without VS Code: every contributed
// command is registered and every registered one contributed, every setting read is declared.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { test } from 'node:test';

const root = resolve(__dirname, '../..');
const manifest = JSON.parse(readFileSync(resolve(root, 'package.json'), 'utf8')) as {
  main: string;
  engines: { vscode: string };
  devDependencies: Record<string, string>;
  contributes: {
    commands: { command: string }[];
    configuration: { properties: Record<string, { default: unknown; enum?: string[]; scope?: string }> };
  };
};
const extension = readFileSync(resolve(root, 'src/extension.ts'), 'utf8');

test('contributed commands are the registered ones', () => {
  const registered = [...extension.matchAll(/^ {4}'(cellbox\.\w+)': /gm)].map((m) => m[1]).sort();
  assert.deepEqual(manifest.contributes.commands.map((c) => c.command).sort(), registered);
  assert.ok(registered.includes('cellbox.runCell') && extension.includes("command: 'cellbox.runCell'"));
});

test('settings read by the extension are declared, with the documented defaults', () => {
  const read = [...extension.matchAll(/config\(\)\.(?:get|update)(?:<[^>]+>)?\('(\w+)'/g)].map((m) => `cellbox.${m[1]}`);
  const declared = manifest.contributes.configuration.properties;
  assert.deepEqual([...new Set(read)].sort(), Object.keys(declared).sort());
  assert.deepEqual(declared['cellbox.command'].default, ['cellbox', 'serve']);
  assert.equal(declared['cellbox.backend'].default, 'local');
  // Settings that name a program or turn a prompt off are not a workspace's to set.
  const approve = declared['cellbox.approveToolCalls'];
  assert.deepEqual([approve.default, approve.enum, approve.scope], ['ask', ['ask', 'always', 'never'], 'machine']);
  assert.equal(declared['cellbox.command'].scope, 'machine');
  assert.deepEqual([declared['cellbox.mcpServers'].default, declared['cellbox.mcpServers'].scope], [{}, 'machine']);
});

test('the bundle is the entry point, for the VS Code the types describe', () => {
  assert.equal(manifest.main, './dist/extension.js');
  assert.equal(manifest.engines.vscode, `^${manifest.devDependencies['@types/vscode']}`);
});
