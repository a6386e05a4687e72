// VS Code glue: the language client, commands, CodeLens, Output channel, images panel and status
// bar. The logic lives in cells.ts, messages.ts and session.ts, which are tested without VS Code.

import * as path from 'node:path';
import * as vscode from 'vscode';
import { LanguageClient, State } from 'vscode-languageclient/node';
import { APPROVAL_CHOICES, DENY, ToolCallApprover, type ApprovalChoice, type ApprovalMode } from './approval';
import { cellAt, findCells } from './cells';
import { registeredText } from './mcpServers';
import {
  backendChoices,
  cellLabel,
  describeError,
  imagesHtml,
  linesLabel,
  parseModules,
  parsePackages,
  statusText,
  Transcript,
  type ImageView,
} from './messages';
import { ClientRequests, VARIANTS, type ApproveToolCallParams, type Backend, type KernelState } from './protocol';
import { cellboxCapabilities, Session, type KernelHandle, type ProgressListener } from './session';

const DEFAULT_COMMAND = ['cellbox', 'serve'];
const MAX_IMAGES = 20;

let client: LanguageClient | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const config = (): vscode.WorkspaceConfiguration => vscode.workspace.getConfiguration('cellbox');
  const configured = config().get<string[]>('command', DEFAULT_COMMAND);
  const [command, ...args] = configured.length > 0 ? configured : DEFAULT_COMMAND;
  // The client's own channel ("cellbox daemon") gets the daemon's logs; "cellbox" is for runs.
  const languageClient = new LanguageClient(
    'cellbox',
    'cellbox daemon',
    { command, args },
    { documentSelector: [{ scheme: 'file', language: 'python' }, { scheme: 'untitled', language: 'python' }] },
  );
  client = languageClient;
  const output = vscode.window.createOutputChannel('cellbox');
  const images = new ImagesPanel();
  const status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Left);
  status.command = 'cellbox.chooseBackend';
  status.text = statusText(undefined);
  status.show();

  const session = new Session(languageClient, () => ({
    backend: config().get<Backend>('backend'),
    image: config().get<string>('image') || undefined,
    timeout: config().get<number>('timeout'),
    mcpServers: config().get<unknown>('mcpServers'),
  }));
  let kernelState: KernelState | undefined;
  const showStatus = (state: KernelState | undefined): void => {
    kernelState = state;
    status.text = statusText(state);
    const current = session.current;
    status.tooltip = current
      ? `${current.sandbox.backend} sandbox ${current.sandbox.sandboxId}, kernel ${current.kernelId}`
      : undefined;
  };
  session.onKernelStatus(showStatus);
  // A server left out does not stop the session: the cells that do not call it run as before.
  session.onMcpServer((event) => {
    if (event.kind === 'registered') {
      output.appendLine(registeredText(event.result));
      return;
    }
    output.appendLine(`[warning] ${event.message}`);
    if (event.log) output.append(event.log.endsWith('\n') ? event.log : `${event.log}\n`);
    const where = event.log ? ' (its output is in the cellbox Output channel)' : '';
    void vscode.window.showWarningMessage(`cellbox: ${event.message}${where}`);
  });

  // Modal: the cell waits for the answer, and a permission should not be given in passing.
  const approver = new ToolCallApprover(
    () => config().get<ApprovalMode>('approveToolCalls', 'ask'),
    async ({ message, detail }) => {
      const items = APPROVAL_CHOICES.map((title) => ({ title, isCloseAffordance: title === DENY }));
      const picked = await vscode.window.showWarningMessage<{ title: ApprovalChoice }>(
        message,
        { modal: true, detail },
        ...items,
      );
      return picked?.title;
    },
  );
  const approvals = languageClient.onRequest(ClientRequests.approveToolCall, (params: ApproveToolCallParams) =>
    approver.approve(params),
  );

  const showError = (error: unknown): void => {
    const { message, log } = describeError(error);
    if (log) output.append(log);
    void vscode.window.showErrorMessage(`cellbox: ${message}`);
  };
  const started = languageClient.start();
  started.catch(() => undefined); // the client reports a failed start itself; commands report it again

  const reportTo =
    (progress: vscode.Progress<{ message?: string }>): ProgressListener =>
    (value) =>
      progress.report({ message: value.message ?? value.title });

  const kernel = async (): Promise<KernelHandle> => {
    await started;
    if (session.current) return session.current;
    const handle = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: 'cellbox: starting a kernel' },
      (progress) => session.start(reportTo(progress)),
    );
    showStatus(kernelState); // its states came before its id: now the tooltip can name it
    return handle;
  };

  // Runs go one at a time, so their transcripts do not interleave; an interrupt or a restart
  // drops the runs still waiting here (the session cancels those already sent).
  let queue = Promise.resolve();
  let generation = 0;
  const run = (document: vscode.TextDocument, code: string, label: string): void => {
    const queuedIn = generation;
    queue = queue
      .then(async () => {
        if (queuedIn !== generation) return;
        await kernel();
        await session.bind(languageClient.code2ProtocolConverter.asUri(document.uri));
        output.show(true);
        const transcript = new Transcript((text) => output.append(text));
        transcript.begin(label);
        const result = await session.execute(code, {
          onOutput: (n) => transcript.output(n),
          onDisplay: (n) => {
            const image = transcript.display(n);
            if (image) images.show(image);
          },
        });
        transcript.end(result);
      })
      .catch(showError);
  };

  const activePythonEditor = (): vscode.TextEditor | undefined => {
    const editor = vscode.window.activeTextEditor;
    if (editor?.document.languageId === 'python') return editor;
    void vscode.window.showInformationMessage('cellbox: open a Python file first');
    return undefined;
  };

  const commands: Record<string, (...args: never[]) => unknown> = {
    'cellbox.runCell': async (uri?: vscode.Uri, line?: number) => {
      const editor = uri ? undefined : activePythonEditor();
      const document = uri ? await vscode.workspace.openTextDocument(uri) : editor?.document;
      if (!document) return;
      const cell = cellAt(findCells(document.getText()), line ?? editor?.selection.active.line ?? 0);
      if (!cell || cell.code.trim() === '') {
        void vscode.window.showInformationMessage('cellbox: no code in this cell');
      } else if (cell.kind === 'markdown') {
        void vscode.window.showInformationMessage('cellbox: a markdown cell has nothing to run');
      } else {
        run(document, cell.code, cellLabel(path.basename(document.fileName), cell));
      }
    },
    'cellbox.runSelection': () => {
      const editor = activePythonEditor();
      if (!editor) return;
      const { selection, document } = editor;
      // An empty selection runs the cursor's line, as the Python extension does.
      const code = selection.isEmpty ? document.lineAt(selection.active.line).text : document.getText(selection);
      if (code.trim() === '') return;
      run(document, code, `${path.basename(document.fileName)}: ${linesLabel(selection.start.line, selection.end.line)}`);
    },
    'cellbox.runFile': () => {
      const editor = activePythonEditor();
      if (editor) run(editor.document, editor.document.getText(), path.basename(editor.document.fileName));
    },
    'cellbox.installPackage': async () => {
      const input = await vscode.window.showInputBox({
        title: 'cellbox: Install Package',
        prompt: 'Packages for the sandbox, as pip takes them, separated by spaces',
        placeHolder: 'cowsay==6.1 requests>=2.31',
      });
      const packages = parsePackages(input ?? '');
      if (packages.length === 0) return;
      await kernel();
      const { installed } = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: `cellbox: installing ${packages.join(' ')}` },
        (progress) => session.install(packages, reportTo(progress)),
      );
      const what = installed.map((p) => `${p.name} ${p.version}`).join(', ');
      void vscode.window.showInformationMessage(`cellbox: ${what ? `installed ${what}` : 'already installed'}`);
    },
    'cellbox.showSkillSources': async () => {
      const input = await vscode.window.showInputBox({
        title: 'cellbox: Show Skill Sources',
        prompt: "Modules as the sandbox imports them (its workspace's skills/ folder is on the path)",
        placeHolder: 'json.decoder mytools.search',
      });
      const modules = parseModules(input ?? '');
      if (modules.length === 0) return;
      await kernel();
      const { formatted } = await session.skillSources(modules);
      const document = await vscode.workspace.openTextDocument({ language: 'markdown', content: formatted });
      await vscode.window.showTextDocument(document, { preview: false });
    },
    'cellbox.restartKernel': async () => {
      if (!session.current) {
        void vscode.window.showInformationMessage('cellbox: no kernel yet');
        return;
      }
      generation++;
      await session.restart();
    },
    'cellbox.interruptKernel': async () => {
      generation++;
      await session.interrupt();
    },
    'cellbox.chooseBackend': async () => {
      await started;
      const capabilities = cellboxCapabilities(languageClient.initializeResult);
      if (!capabilities) throw new Error(`the server started by ${command} is not cellbox`);
      const imageList = capabilities.backends.includes('docker') ? await session.listImages() : [];
      const picked = await vscode.window.showQuickPick(backendChoices(capabilities.backends, imageList), {
        title: 'cellbox: backend and image of new sandboxes',
      });
      if (!picked) return;
      const target = vscode.workspace.workspaceFolders
        ? vscode.ConfigurationTarget.Workspace
        : vscode.ConfigurationTarget.Global;
      await config().update('backend', picked.backend, target);
      await config().update('image', picked.image ?? '', target);
    },
    'cellbox.buildImage': async () => {
      const picked = await vscode.window.showQuickPick(
        VARIANTS.map((variant) => ({ label: variant, variant })),
        { title: 'cellbox: build a docker image' },
      );
      if (!picked) return;
      const { variant } = picked;
      await started;
      const result = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: `cellbox: building ${variant}` },
        (progress) => session.buildImage({ variant }, reportTo(progress)),
      );
      void vscode.window.showInformationMessage(`cellbox: ${result.tag} ${result.built ? 'built' : 'is up to date'}`);
    },
  };

  context.subscriptions.push(
    output,
    images,
    status,
    session,
    approvals,
    ...Object.entries(commands).map(([name, handler]) =>
      vscode.commands.registerCommand(name, async (...args: never[]) => {
        try {
          await handler(...args);
        } catch (error) {
          showError(error);
        }
      }),
    ),
    vscode.languages.registerCodeLensProvider({ language: 'python' }, { provideCodeLenses: runCellLenses }),
    vscode.workspace.onDidChangeConfiguration((event) => {
      // A new sandbox at the next run, made and registered from the settings then.
      const sandboxSettings = ['cellbox.backend', 'cellbox.image', 'cellbox.mcpServers'];
      if (sandboxSettings.some((name) => event.affectsConfiguration(name))) {
        generation++;
        showStatus(undefined);
        session.reset().catch(showError);
      }
      if (event.affectsConfiguration('cellbox.command')) {
        void vscode.window
          .showInformationMessage('cellbox: reload the window to start the daemon with the new command', 'Reload Window')
          .then((choice) => choice && vscode.commands.executeCommand('workbench.action.reloadWindow'));
      }
    }),
    // The client restarts a daemon that died; the new one has none of the old sandboxes.
    languageClient.onDidChangeState(({ newState }) => {
      if (newState === State.Stopped) {
        session.forget();
        showStatus(undefined);
      }
    }),
  );
}

export function deactivate(): Promise<void> | undefined {
  return client?.stop();
}

function runCellLenses(document: vscode.TextDocument): vscode.CodeLens[] {
  return findCells(document.getText()).flatMap((cell) =>
    cell.markerLine === undefined || cell.kind !== 'code'
      ? []
      : [
          new vscode.CodeLens(new vscode.Range(cell.markerLine, 0, cell.markerLine, 0), {
            title: 'Run Cell',
            tooltip: 'Run this cell in the cellbox kernel',
            command: 'cellbox.runCell',
            arguments: [document.uri, cell.markerLine],
          }),
        ],
  );
}

/** A webview of the latest images, newest first; it loads nothing but data: images. */
class ImagesPanel implements vscode.Disposable {
  private panel?: vscode.WebviewPanel;
  private images: ImageView[] = [];

  show(image: ImageView): void {
    this.images = [image, ...this.images].slice(0, MAX_IMAGES);
    if (!this.panel) {
      this.panel = vscode.window.createWebviewPanel(
        'cellbox.images',
        'cellbox images',
        { viewColumn: vscode.ViewColumn.Beside, preserveFocus: true },
        { enableScripts: false, localResourceRoots: [] },
      );
      this.panel.onDidDispose(() => {
        this.panel = undefined;
        this.images = [];
      });
    }
    this.panel.webview.html = imagesHtml(this.images);
    this.panel.reveal(undefined, true);
  }

  dispose(): void {
    this.panel?.dispose();
  }
}
