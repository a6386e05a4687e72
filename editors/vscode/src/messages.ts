// Pure handling of the daemon's messages: what the Output channel, the images panel, the status
// bar and the pickers show. No VS Code here, so all of it is unit-tested.

import type { Cell } from './cells';
import type {
  Backend,
  DisplayNotification,
  ErrorInfo,
  ExecuteResult,
  ImageInfo,
  KernelState,
  OutputNotification,
} from './protocol';
import { VARIANTS } from './protocol';

export function tracebackText(error: ErrorInfo): string {
  // IPython's entries are chunks, some with their own newlines: joined as Jupyter prints them.
  return error.traceback.join('\n');
}

/** One line after a run: `✓ [1] ok`, `✗ [2] error: ZeroDivisionError: division by zero`. */
export function summary(result: ExecuteResult): string {
  const mark = result.status === 'ok' ? '✓' : '✗';
  const count = result.executionCount != null ? `[${result.executionCount}] ` : '';
  const error = result.error ? `: ${result.error.ename}: ${result.error.evalue}` : '';
  const truncated = result.truncated ? ' (output truncated)' : '';
  return `${mark} ${count}${result.status}${error}${truncated}`;
}

export interface ImageView {
  mime: string;
  /** The image's bytes in base64, for a `data:` URL. */
  base64: string;
  executionId: string;
  /** Where the image was saved: in the workspace, and on this machine where it can see it. */
  file?: string;
  path?: string;
}

// The image types an <img> shows, in the order Jupyter front ends prefer them.
const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/gif', 'image/webp', 'image/svg+xml'];
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** The image of a display, if it has one that an <img> can show. */
export function imageOf(display: DisplayNotification): ImageView | undefined {
  for (const mime of IMAGE_TYPES) {
    const value = display.data[mime];
    if (typeof value !== 'string') continue;
    // SVG comes as XML text; the binary types as base64, which may hold line breaks.
    const base64 = mime === 'image/svg+xml' ? Buffer.from(value, 'utf8').toString('base64') : value.replace(/\s+/g, '');
    if (!BASE64.test(base64)) continue;
    const saved = display.file ? { file: display.file } : {};
    return { mime, base64, executionId: display.executionId, ...saved, path: display.path ?? undefined };
  }
  return undefined;
}

/** What the Output channel shows for a display: its image's file, its text, or its MIME types. */
export function displayText(display: DisplayNotification, image: ImageView | undefined): string {
  if (image) {
    const where = image.path ?? image.file;
    return `[${image.mime}]${where ? ` ${where}` : ''}`;
  }
  const text = display.data['text/plain'];
  if (typeof text === 'string') return text;
  return `[${Object.keys(display.data).join(', ')}]`;
}

/**
 * Writes one run to a text sink (the Output channel): a header, the output as it streams, each
 * display, then the traceback and a summary line. Images are handed back for the panel.
 */
export class Transcript {
  private atLineStart = true;

  constructor(private readonly sink: (text: string) => void) {}

  begin(label: string): void {
    this.line(`>>> ${label}`);
  }

  output(notification: OutputNotification): void {
    this.write(notification.text);
  }

  display(notification: DisplayNotification): ImageView | undefined {
    const image = imageOf(notification);
    this.line(displayText(notification, image));
    return image;
  }

  end(result: ExecuteResult): void {
    if (result.error && result.error.traceback.length > 0) this.line(tracebackText(result.error));
    this.line(summary(result));
  }

  private line(text: string): void {
    if (!this.atLineStart) this.write('\n');
    this.write(text.endsWith('\n') ? text : `${text}\n`);
  }

  private write(text: string): void {
    if (text === '') return;
    this.sink(text);
    this.atLineStart = text.endsWith('\n');
  }
}

export function cellLabel(fileName: string, cell: Cell): string {
  const title = cell.title ? ` "${cell.title}"` : '';
  return `${fileName}: cell ${cell.index + 1}${title} (${linesLabel(cell.startLine, cell.endLine)})`;
}

export function linesLabel(startLine: number, endLine: number): string {
  return startLine === endLine ? `line ${startLine + 1}` : `lines ${startLine + 1}-${endLine + 1}`;
}

const ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** The images panel: newest first, no scripts, and a CSP that loads nothing but data: images. */
export function imagesHtml(images: readonly ImageView[]): string {
  const figures = images.map((image) => {
    const caption = escapeHtml(image.path ?? image.file ?? `${image.executionId} (${image.mime})`);
    // mime comes from IMAGE_TYPES and base64 matched BASE64: neither can leave the attribute.
    return `<figure><img src="data:${image.mime};base64,${image.base64}" alt="${caption}"><figcaption>${caption}</figcaption></figure>`;
  });
  return [
    '<!DOCTYPE html>',
    '<html lang="en"><head><meta charset="utf-8">',
    `<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:;">`,
    '<title>cellbox images</title></head>',
    `<body>${figures.join('\n')}</body></html>`,
  ].join('\n');
}

const STATE_ICONS: Record<KernelState, string> = {
  starting: '$(loading~spin)',
  idle: '$(circle-large-outline)',
  busy: '$(sync~spin)',
  restarting: '$(loading~spin)',
  dead: '$(error)',
};

/** The status bar's text, with a codicon; no state yet means no kernel. */
export function statusText(state: KernelState | undefined): string {
  return state ? `${STATE_ICONS[state]} cellbox: ${state}` : '$(circle-slash) cellbox: no kernel';
}

export interface BackendChoice {
  label: string;
  description: string;
  backend: Backend;
  /** A docker image tag or variant name; undefined for the local backend. */
  image?: string;
}

/** Quick pick items: each advertised backend, docker once per built image and per variant not built yet. */
export function backendChoices(backends: readonly Backend[], images: readonly ImageInfo[]): BackendChoice[] {
  const choices: BackendChoice[] = [];
  if (backends.includes('local')) {
    choices.push({ label: 'local', description: 'kernels as processes on this machine: isolates nothing', backend: 'local' });
  }
  if (backends.includes('docker')) {
    for (const image of images) {
      const description = image.variant ? `variant ${image.variant}` : `built ${image.createdAt}`;
      choices.push({ label: `docker: ${image.tag}`, description, backend: 'docker', image: image.tag });
    }
    for (const variant of VARIANTS.filter((v) => !images.some((image) => image.variant === v))) {
      choices.push({ label: `docker: ${variant}`, description: 'variant, built on first use', backend: 'docker', image: variant });
    }
  }
  return choices;
}

/** Package specs typed in an input box, separated by spaces (a spec may hold commas: `requests>=2,<3`). */
export function parsePackages(input: string): string[] {
  return input.split(/\s+/).filter((name) => name !== '');
}

/** Module names typed in an input box, separated by spaces or commas. */
export function parseModules(input: string): string[] {
  return input.split(/[\s,]+/).filter((name) => name !== '');
}

/** An error of a request as the user reads it, and the install log that InstallFailed carries. */
export function describeError(error: unknown): { message: string; log?: string } {
  if (!(error instanceof Error)) return { message: String(error) };
  const data: unknown = (error as { data?: unknown }).data;
  const log = typeof data === 'object' && data !== null ? (data as { log?: unknown }).log : undefined;
  return typeof log === 'string' ? { message: error.message, log } : { message: error.message };
}
