// The report page's 3-D molecule view: every <canvas class="mol3d" data-mol="{atoms, pos, bonds}"> draws its
// molecule as shaded spheres and bond lines, painted back to front; dragging rotates it. No library, no network.
(function () {
  "use strict";
  var COLOURS = {H: "#e6e6e6", C: "#555555", N: "#3050f8", O: "#ff2020", F: "#70d040", P: "#ff8000", S: "#e0c020",
    Cl: "#1fd01f", Br: "#a62929", I: "#940094", B: "#ffb5b5", Si: "#f0c8a0"};
  var RADII = {H: 0.31, C: 0.76, N: 0.71, O: 0.66, F: 0.57, P: 1.07, S: 1.05, Cl: 1.02, Br: 1.2, I: 1.39, B: 0.84};
  var BACKGROUND = "#f4f6f9";

  function multiply(a, b) {  // 3x3 matrices as flat arrays, row-major
    var out = [];
    for (var i = 0; i < 3; i++) {
      for (var j = 0; j < 3; j++) {
        out.push(a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j]);
      }
    }
    return out;
  }

  function rotation(ax, ay) {  // about the screen's x axis by ax, then its y axis by ay (radians)
    var cx = Math.cos(ax), sx = Math.sin(ax), cy = Math.cos(ay), sy = Math.sin(ay);
    return multiply([cy, 0, sy, 0, 1, 0, -sy, 0, cy], [1, 0, 0, 0, cx, -sx, 0, sx, cx]);
  }

  function shade(hex, amount) {  // a colour lightened (amount > 0) or darkened (< 0)
    var n = parseInt(hex.slice(1), 16), out = [];
    for (var k = 16; k >= 0; k -= 8) {
      var c = (n >> k) & 255;
      out.push(Math.round(amount > 0 ? c + (255 - c) * amount : c * (1 + amount)));
    }
    return "rgb(" + out.join(",") + ")";
  }

  function Viewer(canvas) {
    var mol = JSON.parse(canvas.getAttribute("data-mol"));
    var n = mol.atoms.length, centre = [0, 0, 0], extent = 1;
    mol.pos.forEach(function (p) { for (var k = 0; k < 3; k++) { centre[k] += p[k] / Math.max(n, 1); } });
    var pos = mol.pos.map(function (p) { return [p[0] - centre[0], p[1] - centre[1], p[2] - centre[2]]; });
    pos.forEach(function (p) { extent = Math.max(extent, Math.hypot(p[0], p[1], p[2]) + 0.8); });
    var rot = rotation(0.5, 0.6);  // a slanted first view: a flat molecule seen edge-on would show little
    var ratio = window.devicePixelRatio || 1;  // drawn at the screen's own resolution, not blurred on high-DPI ones
    canvas.style.width = canvas.width + "px";
    canvas.style.height = canvas.height + "px";
    canvas.width = Math.round(canvas.width * ratio);
    canvas.height = Math.round(canvas.height * ratio);
    var ctx = canvas.getContext("2d");

    function draw() {
      var w = canvas.width, h = canvas.height, scale = 0.46 * Math.min(w, h) / extent;
      ctx.fillStyle = BACKGROUND;
      ctx.fillRect(0, 0, w, h);
      var screen = pos.map(function (p) {
        return [w / 2 + scale * (rot[0] * p[0] + rot[1] * p[1] + rot[2] * p[2]),
          h / 2 - scale * (rot[3] * p[0] + rot[4] * p[1] + rot[5] * p[2]),
          rot[6] * p[0] + rot[7] * p[1] + rot[8] * p[2]];
      });
      var parts = [];  // atoms and bonds, painted far to near (a larger z is nearer the viewer)
      screen.forEach(function (s, i) { parts.push({z: s[2], atom: i}); });
      mol.bonds.forEach(function (b) { parts.push({z: (screen[b[0]][2] + screen[b[1]][2]) / 2 - 0.01, bond: b}); });
      parts.sort(function (a, b) { return a.z - b.z; });
      parts.forEach(function (part) {
        if (part.bond) {
          var a = screen[part.bond[0]], b = screen[part.bond[1]];
          ctx.strokeStyle = "#8a8f98";
          ctx.lineWidth = ratio * (1.5 + 1.5 * part.bond[2]);
          ctx.beginPath();
          ctx.moveTo(a[0], a[1]);
          ctx.lineTo(b[0], b[1]);
          ctx.stroke();
          return;
        }
        var s = screen[part.atom], el = mol.atoms[part.atom], colour = COLOURS[el] || "#d070d0";
        var r = Math.max(2 * ratio, scale * 0.55 * (RADII[el] || 0.8));
        var g = ctx.createRadialGradient(s[0] - r / 3, s[1] - r / 3, r / 8, s[0], s[1], r);
        g.addColorStop(0, shade(colour, 0.7));
        g.addColorStop(0.6, colour);
        g.addColorStop(1, shade(colour, -0.45));
        ctx.fillStyle = g;
        ctx.beginPath();
        ctx.arc(s[0], s[1], r, 0, 2 * Math.PI);
        ctx.fill();
      });
    }

    var last = null;
    canvas.addEventListener("pointerdown", function (e) {
      last = [e.clientX, e.clientY];
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", function (e) {
      if (!last) { return; }
      rot = multiply(rotation((e.clientY - last[1]) * 0.01, (e.clientX - last[0]) * 0.01), rot);
      last = [e.clientX, e.clientY];
      draw();
    });
    ["pointerup", "pointercancel"].forEach(function (name) {
      canvas.addEventListener(name, function () { last = null; });
    });
    draw();
  }

  document.querySelectorAll("canvas.mol3d").forEach(Viewer);
})();
