// Cells of a Python file, as VS Code's Python and Jupyter tooling reads them: a line that starts
// with `# %%` opens a cell (`# %% [markdown]` a markdown one), and the lines before the first
// marker are a cell of their own.

export interface Cell {
  /** 0-based position among the file's cells. */
  index: number;
  kind: 'code' | 'markdown';
  /** The line of the `# %%` marker; undefined for the lines before the first marker. */
  markerLine: number | undefined;
  /** What follows `# %%` on the marker line, trimmed (`Load data` in `# %% Load data`). */
  title: string;
  /** First line (the marker's, when there is one), 0-based. */
  startLine: number;
  /** Last line, inclusive. */
  endLine: number;
  /** The cell's lines after its marker. */
  code: string;
}

const MARKER = /^#\s*%%(.*)$/;
const MARKDOWN = /^\[(markdown|md)\]/i;

export function findCells(text: string): Cell[] {
  const lines = text.split(/\r\n|\r|\n/);
  const markers: number[] = [];
  lines.forEach((line, i) => {
    if (MARKER.test(line)) markers.push(i);
  });
  const cells: Cell[] = [];
  const firstMarker = markers.length > 0 ? markers[0] : lines.length;
  const leading = lines.slice(0, firstMarker);
  // Blank lines before the first marker (or an empty file) are no cell: nothing to run.
  if (leading.some((line) => line.trim() !== '')) {
    cells.push({
      index: 0,
      kind: 'code',
      markerLine: undefined,
      title: '',
      startLine: 0,
      endLine: firstMarker - 1,
      code: leading.join('\n'),
    });
  }
  markers.forEach((markerLine, i) => {
    const endLine = i + 1 < markers.length ? markers[i + 1] - 1 : lines.length - 1;
    const title = (MARKER.exec(lines[markerLine])?.[1] ?? '').trim();
    cells.push({
      index: cells.length,
      kind: MARKDOWN.test(title) ? 'markdown' : 'code',
      markerLine,
      title,
      startLine: markerLine,
      endLine,
      code: lines.slice(markerLine + 1, endLine + 1).join('\n'),
    });
  });
  return cells;
}

/** The cell that holds `line`, or undefined for a line in blank lines before the first marker. */
export function cellAt(cells: readonly Cell[], line: number): Cell | undefined {
  return cells.find((cell) => cell.startLine <= line && line <= cell.endLine);
}
