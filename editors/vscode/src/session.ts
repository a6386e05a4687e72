// One editor's use of the daemon: a sandbox and a kernel made on first use (with the configured
// MCP servers registered in the sandbox), executions whose streamed output is routed by
// executionId, installs and builds with work-done progress.
// It talks through `Connection`, which both vscode-languageclient's LanguageClient and
// vscode-jsonrpc's MessageConnection satisfy, so it is tested against the real daemon without VS Code.

import { CancellationTokenSource, ProgressType, ResponseError } from 'vscode-jsonrpc';
import type { CancellationToken } from 'vscode-jsonrpc';
import { mcpServersOf, registrationProblem, type McpServerEvent } from './mcpServers';
import {
  Methods,
  Notifications,
  REQUEST_CANCELLED,
  type Backend,
  type BuildImageParams,
  type BuildImageResult,
  type CellboxCapabilities,
  type CreateSandboxParams,
  type CreateSandboxResult,
  type DisplayNotification,
  type ExecuteResult,
  type GetSkillSourcesResult,
  type ImageInfo,
  type InstallPackageResult,
  type KernelState,
  type KernelStatusNotification,
  type ListImagesResult,
  type OutputNotification,
  type ProgressToken,
  type RegisterMcpServerParams,
  type RegisterMcpServerResult,
  type StartKernelResult,
  type WorkDoneProgress,
} from './protocol';

export interface Disposable {
  dispose(): void;
}

export interface Connection {
  sendRequest<R>(method: string, params: unknown, token?: CancellationToken): Promise<R>;
  onNotification<P>(method: string, handler: (params: P) => void): Disposable;
  // `$/progress` is consumed by vscode-jsonrpc itself and handed out per token, not through onNotification.
  onProgress<P>(type: ProgressType<P>, token: ProgressToken, handler: (value: P) => void): Disposable;
}

export interface SessionSettings {
  backend?: Backend;
  /** A docker image tag or variant; not sent for the local backend, which refuses it. */
  image?: string;
  /** Seconds an execution may run. */
  timeout?: number;
  /** The `cellbox.mcpServers` setting as the user wrote it: checked, and registered, in each new sandbox. */
  mcpServers?: unknown;
}

export interface ExecuteHandlers {
  onOutput?(notification: OutputNotification): void;
  onDisplay?(notification: DisplayNotification): void;
}

export type ProgressListener = (value: WorkDoneProgress) => void;

export interface KernelHandle {
  sandbox: CreateSandboxResult;
  kernelId: string;
}

const workDone = new ProgressType<WorkDoneProgress>();

/** `capabilities.experimental.cellbox` of an `initialize` result, if the server is cellbox. */
export function cellboxCapabilities(initializeResult: unknown): CellboxCapabilities | undefined {
  const capabilities = (initializeResult as { capabilities?: { experimental?: { cellbox?: CellboxCapabilities } } })
    ?.capabilities;
  return capabilities?.experimental?.cellbox;
}

/** The partial result that a cancelled execute answers in its error's data. */
function cancelledResult(error: unknown): ExecuteResult | undefined {
  if (!(error instanceof ResponseError) || error.code !== REQUEST_CANCELLED) return undefined;
  const data: unknown = error.data;
  return typeof data === 'object' && data !== null ? (data as { result?: ExecuteResult }).result : undefined;
}

export class Session implements Disposable {
  private kernel?: Promise<KernelHandle>;
  private ready?: KernelHandle;
  private readonly running = new Map<string, { handlers: ExecuteHandlers; cancel: CancellationTokenSource }>();
  private readonly statusListeners = new Set<(state: KernelState) => void>();
  private readonly mcpListeners = new Set<(event: McpServerEvent) => void>();
  private readonly bound = new Set<string>();
  private readonly subscriptions: Disposable[];
  private epoch = 0;
  private executions = 0;
  private progressTokens = 0;

  constructor(
    private readonly connection: Connection,
    private readonly settings: () => SessionSettings,
  ) {
    this.subscriptions = [
      connection.onNotification<OutputNotification>(Notifications.output, (n) =>
        this.running.get(n.executionId)?.handlers.onOutput?.(n),
      ),
      connection.onNotification<DisplayNotification>(Notifications.display, (n) =>
        this.running.get(n.executionId)?.handlers.onDisplay?.(n),
      ),
      connection.onNotification<KernelStatusNotification>(Notifications.kernelStatus, (n) => {
        // While the kernel starts its id is not known yet; after a reset the old kernel's are stale.
        const mine = this.ready ? n.kernelId === this.ready.kernelId : this.kernel !== undefined;
        if (mine) for (const listener of this.statusListeners) listener(n.state);
      }),
    ];
  }

  /** The sandbox and kernel, once made. */
  get current(): KernelHandle | undefined {
    return this.ready;
  }

  onKernelStatus(listener: (state: KernelState) => void): Disposable {
    this.statusListeners.add(listener);
    return { dispose: () => this.statusListeners.delete(listener) };
  }

  /** Hears, for each new sandbox, which configured MCP servers were registered and which were not. */
  onMcpServer(listener: (event: McpServerEvent) => void): Disposable {
    this.mcpListeners.add(listener);
    return { dispose: () => this.mcpListeners.delete(listener) };
  }

  /** The kernel, made with its sandbox on first call; `onProgress` hears how the sandbox is made. */
  start(onProgress?: ProgressListener): Promise<KernelHandle> {
    if (!this.kernel) {
      // A reset while this start is in flight makes its kernel the old one, which reset removes.
      const epoch = this.epoch;
      this.kernel = this.createKernel(onProgress).then(
        (handle) => {
          if (epoch === this.epoch) this.ready = handle;
          return handle;
        },
        (error: unknown) => {
          if (epoch === this.epoch) this.kernel = undefined;
          throw error;
        },
      );
    }
    return this.kernel;
  }

  private async createKernel(onProgress?: ProgressListener): Promise<KernelHandle> {
    const { backend, image, mcpServers } = this.settings();
    const params: CreateSandboxParams = { backend, image: backend === 'docker' ? image : undefined };
    const sandbox = await this.withWorkDone<CreateSandboxResult>(Methods.createSandbox, params, onProgress);
    // The servers start while the kernel does; both are done before the first cell runs.
    const [kernel] = await Promise.allSettled([
      this.connection.sendRequest<StartKernelResult>(Methods.startKernel, { sandboxId: sandbox.sandboxId }),
      this.registerMcpServers(sandbox.sandboxId, mcpServers),
    ]);
    if (kernel.status === 'fulfilled') return { sandbox, kernelId: kernel.value.kernelId };
    // The next start makes a new sandbox: this one would idle until the daemon exits.
    await this.connection.sendRequest(Methods.destroySandbox, { sandboxId: sandbox.sandboxId }).catch(() => undefined);
    throw kernel.reason;
  }

  /** Registers the setting's servers; one that is misconfigured or fails is reported and left out. */
  private async registerMcpServers(sandboxId: string, setting: unknown): Promise<void> {
    const emit = (event: McpServerEvent): void => {
      for (const listener of this.mcpListeners) listener(event);
    };
    const { servers, problems } = mcpServersOf(setting);
    for (const message of problems) emit({ kind: 'problem', message });
    await Promise.all(
      servers.map(async (server) => {
        const params: RegisterMcpServerParams = { sandboxId, ...server };
        try {
          const result = await this.connection.sendRequest<RegisterMcpServerResult>(Methods.registerMcpServer, params);
          emit({ kind: 'registered', result });
        } catch (error) {
          emit(registrationProblem(server.name, error));
        }
      }),
    );
  }

  /**
   * Runs code in the kernel. Output and displays reach `handlers` before the result; an
   * execution that `interrupt` cancelled answers its partial result, status `cancelled`.
   */
  async execute(code: string, handlers: ExecuteHandlers = {}): Promise<ExecuteResult> {
    const { kernelId } = await this.start();
    const executionId = `cell-${++this.executions}`;
    const cancel = new CancellationTokenSource();
    this.running.set(executionId, { handlers, cancel });
    try {
      const params = { kernelId, code, executionId, timeout: this.settings().timeout };
      return await this.connection.sendRequest<ExecuteResult>(Methods.execute, params, cancel.token);
    } catch (error) {
      const partial = cancelledResult(error);
      if (partial) return partial;
      throw error;
    } finally {
      this.running.delete(executionId);
      cancel.dispose();
    }
  }

  /**
   * Stops what this session runs: cancelling an execute interrupts the kernel if it is running
   * and drops it if it still waits in the kernel's queue. With nothing running, interrupts the kernel.
   */
  async interrupt(): Promise<void> {
    if (this.running.size > 0) {
      for (const { cancel } of this.running.values()) cancel.cancel();
    } else if (this.ready) {
      await this.connection.sendRequest<null>(Methods.interruptKernel, { kernelId: this.ready.kernelId });
    }
  }

  /** A fresh process under the same kernel id: state is lost, bindings stay valid. */
  async restart(): Promise<void> {
    if (this.ready) await this.connection.sendRequest<null>(Methods.restartKernel, { kernelId: this.ready.kernelId });
  }

  /** Completion and hover for the document at `uri` (as the language client sends it) from this kernel. */
  async bind(uri: string): Promise<void> {
    const { kernelId } = await this.start();
    if (this.bound.has(uri)) return;
    await this.connection.sendRequest<null>(Methods.bindDocument, { uri, kernelId });
    this.bound.add(uri);
  }

  async install(packages: string[], onProgress?: ProgressListener): Promise<InstallPackageResult> {
    const { sandbox } = await this.start();
    return this.withWorkDone(Methods.installPackage, { sandboxId: sandbox.sandboxId, packages }, onProgress);
  }

  async skillSources(modules: string[]): Promise<GetSkillSourcesResult> {
    const { sandbox } = await this.start();
    return this.connection.sendRequest(Methods.getSkillSources, { sandboxId: sandbox.sandboxId, modules });
  }

  async listImages(): Promise<ImageInfo[]> {
    return (await this.connection.sendRequest<ListImagesResult>(Methods.listImages, {})).images;
  }

  buildImage(params: BuildImageParams, onProgress?: ProgressListener): Promise<BuildImageResult> {
    return this.withWorkDone(Methods.buildImage, params, onProgress);
  }

  /** Removes the sandbox and its kernel; the next use makes new ones from the settings then. */
  async reset(): Promise<void> {
    const kernel = this.kernel;
    this.forget();
    const handle = await kernel?.catch(() => undefined);
    if (handle) await this.connection.sendRequest<null>(Methods.destroySandbox, { sandboxId: handle.sandbox.sandboxId });
  }

  /** Drops the sandbox and kernel without asking the daemon, which no longer has them (it restarted). */
  forget(): void {
    this.epoch++;
    this.kernel = undefined;
    this.ready = undefined;
    this.bound.clear();
  }

  dispose(): void {
    for (const subscription of this.subscriptions) subscription.dispose();
    this.statusListeners.clear();
    this.mcpListeners.clear();
  }

  private async withWorkDone<R>(method: string, params: object, onProgress?: ProgressListener): Promise<R> {
    if (!onProgress) return this.connection.sendRequest<R>(method, params);
    const workDoneToken = `cellbox-progress-${++this.progressTokens}`;
    const subscription = this.connection.onProgress(workDone, workDoneToken, onProgress);
    try {
      return await this.connection.sendRequest<R>(method, { ...params, workDoneToken });
    } finally {
      subscription.dispose();
    }
  }
}
