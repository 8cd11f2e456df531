// The theme chosen on this browser (light, dark, or none: the system's), set on <html> before the
// page paints, so that a dark page never flashes white. A classic script, in <head>: the CSP allows
// no inline one.
try {
  const theme = localStorage.getItem("chatserve.theme");
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
} catch {
  // storage refused (a privacy setting): the system's theme
}
