// The parts of cellbox's wire protocol (protocol/schema.json) that the extension uses.

export const Methods = {
  createSandbox: 'cellbox/createSandbox',
  destroySandbox: 'cellbox/destroySandbox',
  startKernel: 'cellbox/startKernel',
  shutdownKernel: 'cellbox/shutdownKernel',
  interruptKernel: 'cellbox/interruptKernel',
  restartKernel: 'cellbox/restartKernel',
  execute: 'cellbox/execute',
  installPackage: 'cellbox/installPackage',
  getSkillSources: 'cellbox/getSkillSources',
  buildImage: 'cellbox/buildImage',
  listImages: 'cellbox/listImages',
  bindDocument: 'cellbox/bindDocument',
  writeFile: 'cellbox/writeFile',
  readFile: 'cellbox/readFile',
  listFiles: 'cellbox/listFiles',
  deleteFile: 'cellbox/deleteFile',
  registerMcpServer: 'cellbox/registerMcpServer',
} as const;

/** Requests the daemon sends its client. */
export const ClientRequests = {
  approveToolCall: 'cellbox/approveToolCall',
} as const;

export const Notifications = {
  output: 'cellbox/output',
  display: 'cellbox/display',
  kernelStatus: 'cellbox/kernelStatus',
} as const;

/** JSON-RPC error code of a cancelled request; a cancelled execute's partial result is in `data.result`. */
export const REQUEST_CANCELLED = -32800;

export type Backend = 'local' | 'docker';
export type Variant = 'minimal' | 'basic' | 'example';
export const VARIANTS: readonly Variant[] = ['minimal', 'basic', 'example'];
export type KernelState = 'starting' | 'idle' | 'busy' | 'restarting' | 'dead';
export type ExecuteStatus = 'ok' | 'error' | 'timeout' | 'cancelled' | 'died';
export type ProgressToken = number | string;

/** `capabilities.experimental.cellbox` of the `initialize` result. */
export interface CellboxCapabilities {
  protocolVersion: number;
  backends: Backend[];
  defaultBackend: Backend;
}

export interface CreateSandboxParams {
  backend?: Backend;
  image?: string;
  workDoneToken?: ProgressToken;
}

export interface CreateSandboxResult {
  sandboxId: string;
  backend: Backend;
  /** The workspace as the sandbox's kernels see it (their working directory). */
  sandboxWorkspace: string;
  /** The workspace on this machine, where this machine can see it (the local backend). */
  workspace?: string | null;
  image?: string;
}

/** Files: `path` is relative to the sandbox's workspace, content base64. */
export interface WriteFileParams {
  sandboxId: string;
  path: string;
  content: string;
  append?: boolean;
  mode?: number;
}

export interface ReadFileResult {
  content: string;
  size: number;
  eof: boolean;
}

export interface StartKernelResult {
  kernelId: string;
  sandboxId: string;
}

export interface ErrorInfo {
  ename: string;
  evalue: string;
  traceback: string[];
}

/** MIME bundle: binary types are base64 strings, text types strings (or JSON for application/json). */
export type MimeBundle = Record<string, unknown>;

/** An output or display; an image is also saved in the workspace: `file` is its path there
 * (readable with readFile), `path` its path on the daemon's machine where that machine sees it. */
export interface Output {
  data: MimeBundle;
  metadata: Record<string, unknown>;
  path?: string | null;
  file?: string | null;
}

export interface ExecuteResult {
  executionId: string;
  status: ExecuteStatus;
  text: string;
  outputs: Output[];
  truncated: boolean;
  executionCount?: number | null;
  error?: ErrorInfo | null;
}

export interface InstalledPackage {
  name: string;
  version: string;
}

export interface InstallPackageResult {
  installed: InstalledPackage[];
}

export interface GetSkillSourcesResult {
  sources: Record<string, string>;
  formatted: string;
}

export interface BuildImageParams {
  tag?: string;
  variant?: Variant;
  workDoneToken?: ProgressToken;
}

export interface BuildImageResult {
  tag: string;
  imageId: string;
  built: boolean;
}

export interface ImageInfo {
  tag: string;
  imageId: string;
  createdAt: string;
  variant?: Variant | null;
}

export interface ListImagesResult {
  images: ImageInfo[];
}

/** How the daemon reaches an MCP server: a command it runs (stdio) or a URL (streamable HTTP). */
export type McpServerSpec =
  | { command: string; args?: string[]; env?: Record<string, string>; cwd?: string }
  | { url: string; headers?: Record<string, string> };

/** Whether the daemon asks its client (`cellbox/approveToolCall`) before each call of the server's tools. */
export type McpApproval = 'ask' | 'never';

export interface RegisterMcpServerParams {
  sandboxId: string;
  /** A Python identifier: the sandbox imports the tools as `mcptools.<name>`. */
  name: string;
  server: McpServerSpec;
  approval?: McpApproval;
}

export interface RegisterMcpServerResult {
  name: string;
  package: string;
  tools: { name: string; function: string; description: string }[];
}

/** The daemon asks before a cell calls a tool of a server registered with `approval: "ask"`. */
export interface ApproveToolCallParams {
  sandboxId: string;
  kernelId: string;
  executionId: string | null;
  server: string;
  tool: string;
  arguments: Record<string, unknown>;
}

export interface ApproveToolCallResult {
  approved: boolean;
}

export interface OutputNotification {
  executionId: string;
  kernelId: string;
  stream: 'stdout' | 'stderr';
  text: string;
}

export interface DisplayNotification {
  executionId: string;
  kernelId: string;
  data: MimeBundle;
  metadata: Record<string, unknown>;
  path?: string | null;
  file?: string | null;
}

export interface KernelStatusNotification {
  kernelId: string;
  state: KernelState;
}

/** The value of a `$/progress` notification for a work-done token. */
export interface WorkDoneProgress {
  kind: 'begin' | 'report' | 'end';
  title?: string;
  message?: string;
  percentage?: number;
}
