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
const MAX_ARGUMENT_LINES = 30;

/** The arguments as pretty-printed JSON, cut to a size a dialog shows whole. */
export function argumentsText(
  args: Record<string, unknown>,
  maxChars = MAX_ARGUMENT_CHARS,
  maxLines = MAX_ARGUMENT_LINES,
): string {
  const full = JSON.stringify(args, null, 2);
  let shown = full.split('\n').slice(0, maxLines).join('\n').slice(0, maxChars);
  // Not half of a surrogate pair.
  if (/[\uD800-\uDBFF]$/.test(shown)) shown = shown.slice(0, -1);
  return shown.length < full.length ? `${shown}\n… (${full.length - shown.length} more characters)` : full;
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
