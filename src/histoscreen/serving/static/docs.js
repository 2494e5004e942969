// Starts Swagger UI on /docs from a file, not an inline script: the pages' CSP runs no inline script.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
});
