import assert from 'node:assert/strict';
import { test } from 'node:test';
import { findCells } from '../src/cells';
import {
  backendChoices,
  cellLabel,
  describeError,
  displayText,
  imageOf,
  imagesHtml,
  parseModules,
  parsePackages,
  statusText,
  summary,
  tracebackText,
  Transcript,
} from '../src/messages';
import type { DisplayNotification, ExecuteResult } from '../src/protocol';
import { ResponseError } from 'vscode-jsonrpc';

const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==';

const zeroDivision: ExecuteResult = {
  executionId: 'cell-2',
  status: 'error',
  text: '',
  outputs: [],
  truncated: false,
  executionCount: 2,
  error: {
    ename: 'ZeroDivisionError',
    evalue: 'division by zero',
    traceback: [
      '-----',
      'ZeroDivisionError                         Traceback (most recent call last)',
      'Cell In[2], line 1\n----> 1 1/0\n',
      'ZeroDivisionError: division by zero',
    ],
  },
};

function display(data: Record<string, unknown>, path?: string): DisplayNotification {
  return { executionId: 'cell-1', kernelId: 'k-1', data, metadata: {}, path };
}

test('summary: count, status, error and truncation', () => {
  assert.equal(summary({ ...zeroDivision, status: 'ok', error: null, executionCount: 1 }), '✓ [1] ok');
  assert.equal(summary(zeroDivision), '✗ [2] error: ZeroDivisionError: division by zero');
  assert.equal(
    summary({ executionId: 'c', status: 'cancelled', text: 'a', outputs: [], truncated: true }),
    '✗ cancelled (output truncated)',
  );
  assert.equal(
    summary({ ...zeroDivision, status: 'died', error: { ename: 'KernelDied', evalue: 'exit code 1', traceback: [] } }),
    '✗ [2] died: KernelDied: exit code 1',
  );
});

test('tracebackText joins the chunks as Jupyter prints them', () => {
  assert.equal(
    tracebackText(zeroDivision.error!),
    '-----\nZeroDivisionError                         Traceback (most recent call last)\n' +
      'Cell In[2], line 1\n----> 1 1/0\n\nZeroDivisionError: division by zero',
  );
});

test('imageOf: PNG by preference, SVG encoded, bad base64 refused, text none', () => {
  const png = imageOf(display({ 'image/png': `${PNG.slice(0, 20)}\n${PNG.slice(20)}`, 'image/jpeg': 'AAAA', 'text/plain': '<Figure>' }, '/w/images/cell-1-1.png'));
  assert.deepEqual(png, { mime: 'image/png', base64: PNG, executionId: 'cell-1', path: '/w/images/cell-1-1.png' });
  const svg = imageOf(display({ 'image/svg+xml': '<svg xmlns="http://www.w3.org/2000/svg"/>' }));
  assert.equal(svg?.mime, 'image/svg+xml');
  assert.equal(Buffer.from(svg!.base64, 'base64').toString(), '<svg xmlns="http://www.w3.org/2000/svg"/>');
  assert.equal(svg?.path, undefined);
  assert.equal(imageOf(display({ 'image/png': '" onerror="alert(1)' })), undefined);
  assert.equal(imageOf(display({ 'text/plain': '42' })), undefined);
});

test('displayText: the image file, else text/plain, else the MIME types', () => {
  const withImage = display({ 'image/png': PNG }, '/w/images/cell-1-1.png');
  assert.equal(displayText(withImage, imageOf(withImage)), '[image/png] /w/images/cell-1-1.png');
  assert.equal(displayText(display({ 'text/plain': '42' }), undefined), '42');
  assert.equal(displayText(display({ 'text/html': '<b>x</b>', 'application/json': {} }), undefined), '[text/html, application/json]');
});

test('Transcript: header, live output, displays, traceback and summary on their own lines', () => {
  let text = '';
  const transcript = new Transcript((chunk) => (text += chunk));
  transcript.begin('demo.py: cell 1 (lines 1-2)');
  transcript.output({ executionId: 'cell-1', kernelId: 'k', stream: 'stdout', text: 'partial' });
  transcript.output({ executionId: 'cell-1', kernelId: 'k', stream: 'stderr', text: ' line\nwarning' });
  const image = transcript.display(display({ 'image/png': PNG, 'text/plain': '<Figure>' }, '/w/a.png'));
  transcript.end(zeroDivision);
  assert.equal(image?.mime, 'image/png');
  assert.equal(
    text,
    '>>> demo.py: cell 1 (lines 1-2)\npartial line\nwarning\n[image/png] /w/a.png\n' +
      `${tracebackText(zeroDivision.error!)}\n✗ [2] error: ZeroDivisionError: division by zero\n`,
  );
});

test('cellLabel names the file, the cell, its title and its lines', () => {
  const [first, second] = findCells('# %% Load data\nx = 1\n# %%\ny = 2');
  assert.equal(cellLabel('demo.py', first), 'demo.py: cell 1 "Load data" (lines 1-2)');
  assert.equal(cellLabel('demo.py', { ...second, endLine: 2 }), 'demo.py: cell 2 (line 3)');
});

test('imagesHtml: data: images only, under a CSP that loads nothing else', () => {
  const html = imagesHtml([{ mime: 'image/png', base64: PNG, executionId: 'cell-1', path: '/w/<a>.png' }]);
  assert.match(html, /<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:;">/);
  assert.ok(html.includes(`<img src="data:image/png;base64,${PNG}" alt="/w/&lt;a&gt;.png">`));
  assert.doesNotMatch(html, /<script|https?:/);
});

test('statusText shows the state with an icon, or no kernel', () => {
  assert.equal(statusText('busy'), '$(sync~spin) cellbox: busy');
  assert.equal(statusText(undefined), '$(circle-slash) cellbox: no kernel');
});

test('backendChoices: advertised backends, built images, variants not built yet', () => {
  assert.deepEqual(
    backendChoices(['local'], []).map((c) => c.label),
    ['local'],
  );
  const choices = backendChoices(
    ['local', 'docker'],
    [
      { tag: 'cellbox:basic-1', imageId: 'sha256:1', createdAt: '2026-01-01', variant: 'basic' },
      { tag: 'notes-agent:1', imageId: 'sha256:2', createdAt: '2026-01-02' },
    ],
  );
  assert.deepEqual(
    choices.map((c) => [c.label, c.backend, c.image]),
    [
      ['local', 'local', undefined],
      ['docker: cellbox:basic-1', 'docker', 'cellbox:basic-1'],
      ['docker: notes-agent:1', 'docker', 'notes-agent:1'],
      ['docker: minimal', 'docker', 'minimal'],
      ['docker: example', 'docker', 'example'],
    ],
  );
});

test('input parsing: packages by spaces, modules by spaces or commas', () => {
  assert.deepEqual(parsePackages('  cowsay==6.1  requests>=2,<3 '), ['cowsay==6.1', 'requests>=2,<3']);
  assert.deepEqual(parseModules('json.decoder, notes  tools.search'), ['json.decoder', 'notes', 'tools.search']);
  assert.deepEqual(parsePackages('   '), []);
});

test('describeError keeps the install log of InstallFailed', () => {
  assert.deepEqual(describeError(new ResponseError(1005, 'install failed', { log: 'pip said no' })), {
    message: 'install failed',
    log: 'pip said no',
  });
  assert.deepEqual(describeError(new ResponseError(1002, 'kernel not found')), { message: 'kernel not found' });
  assert.deepEqual(describeError('boom'), { message: 'boom' });
});
