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
    detail: 'Arguments:\n{\n  "timezone": "UTC"\n}',
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

test('argumentsText: pretty JSON, cut by characters or lines, never inside a character', () => {
  assert.equal(argumentsText({}), '{}');
  assert.equal(argumentsText({ a: [1, 2] }), '{\n  "a": [\n    1,\n    2\n  ]\n}');
  const long = argumentsText({ text: 'x'.repeat(5000) });
  assert.ok(long.startsWith('{\n  "text": "xxx'));
  assert.match(long, /x\n… \(3516 more characters\)$/);
  assert.equal(long.split('\n').length, 3);

  const many = Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`k${i}`, i]));
  const cut = argumentsText(many, 10_000, 5).split('\n');
  assert.deepEqual(cut.slice(0, 5), ['{', '  "k0": 0,', '  "k1": 1,', '  "k2": 2,', '  "k3": 3,']);
  assert.match(cut[5], /^… \(\d+ more characters\)$/);
  assert.equal(cut.length, 6);

  // The 11th character is the first half of the first emoji.
  assert.equal(argumentsText({ e: '😀😀' }, 11), '{\n  "e": "\n… (7 more characters)');
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
