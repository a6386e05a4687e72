import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { test } from 'node:test';
import {
  ALLOW,
  ALLOW_IN_SANDBOX,
  APPROVAL_CHOICES,
  DENY,
  ToolCallApprover,
  approvalPrompt,
  argumentsText,
  type ApprovalChoice,
  type ApprovalMode,
  type ApprovalPrompt,
} from '../src/approval';
import { ClientRequests, type ApproveToolCallParams } from '../src/protocol';

const call: ApproveToolCallParams = {
  sandboxId: 'sb-1',
  kernelId: 'k-1',
  executionId: 'cell-1',
  server: 'time',
  tool: 'get_current_time',
  arguments: { timezone: 'UTC' },
};

/** An approver whose user gives `answers` in turn; `prompts` records what they were shown. */
function scripted(mode: ApprovalMode, ...answers: (ApprovalChoice | undefined)[]) {
  const prompts: ApprovalPrompt[] = [];
  const approver = new ToolCallApprover(
    () => mode,
    async (prompt) => {
      prompts.push(prompt);
      assert.ok(answers.length > 0, `asked once too often: ${prompt.message}`);
      return answers.shift();
    },
  );
  return { approver, prompts };
}

test('ask: Allow approves, Deny and a dismissed prompt refuse', async () => {
  const { approver, prompts } = scripted('ask', ALLOW, DENY, undefined);
  assert.deepEqual(await approver.approve(call), { approved: true });
  assert.deepEqual(await approver.approve(call), { approved: false });
  assert.deepEqual(await approver.approve(call), { approved: false });
  assert.equal(prompts.length, 3);
  assert.deepEqual(prompts[0], {
    message: 'cellbox: allow a cell to call the tool "get_current_time" of the MCP server "time"?',
    detail: 'Arguments:\n  "timezone": "UTC"',
  });
  assert.deepEqual(APPROVAL_CHOICES, [ALLOW, ALLOW_IN_SANDBOX, DENY]);
});

test('ask: Allow in This Sandbox approves that tool of that server in that sandbox from then on', async () => {
  const { approver, prompts } = scripted('ask', ALLOW_IN_SANDBOX, DENY, DENY);
  assert.deepEqual(await approver.approve(call), { approved: true });
  assert.deepEqual(await approver.approve({ ...call, executionId: 'cell-2', arguments: {} }), { approved: true });
  assert.equal(prompts.length, 1);
  assert.deepEqual(await approver.approve({ ...call, tool: 'convert_time' }), { approved: false });
  assert.deepEqual(await approver.approve({ ...call, sandboxId: 'sb-2' }), { approved: false });
  assert.equal(prompts.length, 3);
});

test('always and never answer without asking', async () => {
  assert.deepEqual(await scripted('always').approver.approve(call), { approved: true });
  assert.deepEqual(await scripted('never').approver.approve(call), { approved: false });
});

test('argumentsText: every key on a line of its own, each value cut to its share, never inside a character', () => {
  assert.equal(argumentsText({}), '(no arguments)');
  assert.equal(argumentsText({ a: [1, 2], b: { c: null } }), '  "a": [1,2]\n  "b": {"c":null}');
  // A key is JSON-quoted: its newline cannot fake a line of its own.
  assert.equal(argumentsText({ 'x\n  "y': 1 }), '  "x\\n  \\"y": 1');

  const long = argumentsText({ text: 'x'.repeat(5000) });
  assert.equal(long, `  "text": "${'x'.repeat(1499)}... (5002 characters in all)`);

  // Padding cannot push a key out of sight: each of the two gets half of the limit.
  const padded = argumentsText({ pad: 'x'.repeat(2000), cmd: 'rm -rf ~' }).split('\n');
  assert.deepEqual(padded, [`  "pad": "${'x'.repeat(749)}... (2002 characters in all)`, '  "cmd": "rm -rf ~"']);
  const detail = approvalPrompt({ ...call, arguments: { pad: 'x'.repeat(2000), cmd: 'rm -rf ~' } }).detail;
  assert.ok(detail.endsWith('\n  "cmd": "rm -rf ~"'), detail);

  // Every key, however many: each value gets at least 40 characters.
  const many = Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`k${i}`, `${i}`.repeat(50)]));
  const lines = argumentsText(many, 1000).split('\n');
  assert.equal(lines.length, 100);
  assert.equal(lines[99], `  "k99": "${'99'.repeat(19)}9... (102 characters in all)`);

  // The 42nd character is an emoji: cut by characters, not by UTF-16 code units.
  const emoji = argumentsText({ e: `${'a'.repeat(40)}😀😀` }, 42);
  assert.equal(emoji, `  "e": "${'a'.repeat(40)}😀... (44 characters in all)`);
});

test('approvalPrompt quotes a name that would break the message', () => {
  const { message } = approvalPrompt({ ...call, tool: 'evil\nAllowed already' });
  assert.equal(message, 'cellbox: allow a cell to call the tool "evil\\nAllowed already" of the MCP server "time"?');
});

test('the request and its answer are those of protocol/schema.json', () => {
  const schema = JSON.parse(readFileSync(resolve(__dirname, '../../../../protocol/schema.json'), 'utf8')) as {
    clientRequests: Record<string, { params: { $ref: string }; result: { $ref: string } }>;
    $defs: Record<string, { properties: Record<string, unknown>; required: string[] }>;
  };
  const request = schema.clientRequests[ClientRequests.approveToolCall];
  assert.ok(request, `${ClientRequests.approveToolCall} is not among the schema's clientRequests`);
  const def = (ref: { $ref: string }) => schema.$defs[ref.$ref.replace('#/$defs/', '')];
  assert.deepEqual(Object.keys(call).sort(), Object.keys(def(request.params).properties).sort());
  assert.deepEqual(def(request.result).required, ['approved']);
});
