// The admin page's objectives: one small line chart per figure of GET /api/admin/slo, drawn as SVG,
// with the objective as a dashed line and the latest value in words.
import { api } from './common.js';

const SVG = 'http://www.w3.org/2000/svg';
const W = 320;
const H = 120;
const PAD = 4;
const box = document.getElementById('slo');
const hours = document.getElementById('slo-hours');

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function show(value, unit) {
  if (value === null || value === undefined) return 'no data';
  return unit === 'ratio' ? `${(value * 100).toFixed(value > 0.999 || value < 0.001 ? 2 : 1)} %` : `${value.toFixed(1)} s`;
}

function chart(figure, start, end) {
  const values = figure.points.map((p) => p[1]);
  // A share that should stay high is drawn from a little under its objective to 100 %; the others from 0 to
  // a little over their objective (or their highest value).
  const above = figure.good === 'above';
  const top = above ? 1 : Math.max(figure.objective * 2, ...values);
  const low = above ? Math.min(figure.objective - (1 - figure.objective) * 3, ...values) : 0;
  const x = (t) => PAD + ((t - start) / Math.max(1, end - start)) * (W - 2 * PAD);
  const y = (v) => H - PAD - ((v - low) / Math.max(1e-9, top - low)) * (H - 2 * PAD);
  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'w-full h-28 bg-slate-50 rounded',
    'aria-label': `${figure.title}: ${show(figure.now, figure.unit)}` });
  svg.append(el('line', { x1: PAD, x2: W - PAD, y1: y(figure.objective), y2: y(figure.objective),
    stroke: '#94a3b8', 'stroke-dasharray': '4 3', 'data-objective': figure.objective }));
  if (figure.points.length) {
    const path = figure.points.map((p, i) => `${i ? 'L' : 'M'}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ');
    svg.append(el('path', { d: path, fill: 'none', stroke: '#4f46e5', 'stroke-width': 2, class: 'series' }));
    const [t, v] = figure.points[figure.points.length - 1];  // the latest value, visible even when alone
    svg.append(el('circle', { cx: x(t), cy: y(v), r: 3, fill: '#4f46e5' }));
  }
  return svg;
}

function card(figure, start, end) {
  const ok = figure.now === null ? null
    : (figure.good === 'above' ? figure.now >= figure.objective : figure.now <= figure.objective);
  const div = document.createElement('div');
  div.className = 'slo-figure';
  div.dataset.key = figure.key;
  const title = document.createElement('h3');
  title.className = 'text-sm font-semibold';
  title.textContent = figure.title;
  const now = document.createElement('p');
  now.className = `text-2xl ${ok === false ? 'text-red-700' : 'text-slate-900'}`;
  now.dataset.now = '';
  now.textContent = show(figure.now, figure.unit);
  const goal = document.createElement('p');
  goal.className = 'text-xs text-slate-600';
  goal.textContent = `objective: ${figure.good} ${show(figure.objective, figure.unit)}${ok === false ? ' (missed)' : ''}`;
  div.append(title, now, chart(figure, start, end), goal);
  return div;
}

async function load() {
  try {
    const data = await api('GET', `/api/admin/slo?hours=${hours.value}`);
    box.replaceChildren(...data.figures.map((f) => card(f, data.start, data.end)));
  } catch (err) {
    const p = document.createElement('p');
    p.className = 'msg';
    p.id = 'slo-unavailable';
    p.textContent = `Not available: ${err.message}`;
    box.replaceChildren(p);
  }
}

if (box) {
  load();
  hours.addEventListener('change', load);
  document.getElementById('slo-refresh').addEventListener('click', load);
}
