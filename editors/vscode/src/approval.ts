// The answer to the daemon's `cellbox/approveToolCall`, asked before a cell calls a tool of an MCP
// server registered with `approval: "ask"`. No VS Code here: extension.ts shows the prompt.

import type { ApproveToolCallParams, ApproveToolCallResult } from './protocol';

/** The `cellbox.approveToolCalls` setting. */
export type ApprovalMode = 'ask' | 'always' | 'never';

export const ALLOW = 'Allow';
export const ALLOW_IN_SANDBOX = 'Allow in This Sandbox';
export const DENY = 'Deny';
export type ApprovalChoice = typeof ALLOW | typeof ALLOW_IN_SANDBOX | typeof DENY;
/** The prompt's buttons, in order; Deny is the one that dismissing it means. */
export const APPROVAL_CHOICES: readonly ApprovalChoice[] = [ALLOW, ALLOW_IN_SANDBOX, DENY];

export interface ApprovalPrompt {
  message: string;
  detail: string;
}

/** Shows the prompt; undefined when the user dismissed it. */
export type AskUser = (prompt: ApprovalPrompt) => PromiseLike<ApprovalChoice | undefined>;

const MAX_ARGUMENT_CHARS = 1500;
const MIN_VALUE_CHARS = 40;

/**
 * The arguments, one key a line as `  "key": <value's JSON>`: every key, each value cut to its
 * share of `maxChars` (at least 40 characters), never inside a character. The sandbox chose
 * them, and must not hide a key behind another's long value. Keys are JSON-quoted: a key's
 * newline cannot fake another line.
 */
export function argumentsText(args: Record<string, unknown>, maxChars = MAX_ARGUMENT_CHARS): string {
  const keys = Object.keys(args);
  if (keys.length === 0) return '(no arguments)';
  const share = Math.max(MIN_VALUE_CHARS, Math.floor(maxChars / keys.length));
  return keys
    .map((key) => {
      // By code point: a cut never splits a surrogate pair, and counts characters as the daemon does.
      const text = Array.from(JSON.stringify(args[key]) ?? 'null');
      const shown =
        text.length > share
          ? `${text.slice(0, share).join('')}... (${text.length} characters in all)`
          : text.join('');
      return `  ${JSON.stringify(key)}: ${shown}`;
    })
    .join('\n');
}

export function approvalPrompt(params: ApproveToolCallParams): ApprovalPrompt {
  // JSON-quoted: a tool's name comes from the server, and cannot break the message's lines so.
  const tool = JSON.stringify(params.tool);
  const server = JSON.stringify(params.server);
  return {
    message: `cellbox: allow a cell to call the tool ${tool} of the MCP server ${server}?`,
    detail: `Arguments:\n${argumentsText(params.arguments)}`,
  };
}

/**
 * Decides per the setting: `always`, `never`, else asks the user, unless they allowed that tool
 * of that server in that sandbox before.
 */
export class ToolCallApprover {
  private readonly allowed = new Set<string>();

  constructor(
    private readonly mode: () => ApprovalMode,
    private readonly ask: AskUser,
  ) {}

  async approve(params: ApproveToolCallParams): Promise<ApproveToolCallResult> {
    const mode = this.mode();
    if (mode === 'always') return { approved: true };
    if (mode === 'never') return { approved: false };
    const key = JSON.stringify([params.sandboxId, params.server, params.tool]);
    if (this.allowed.has(key)) return { approved: true };
    const choice = await this.ask(approvalPrompt(params));
    if (choice === ALLOW_IN_SANDBOX) this.allowed.add(key);
    return { approved: choice === ALLOW || choice === ALLOW_IN_SANDBOX };
  }
}
