// Workflows saved before Encode and Interact Start lost their seed's "control after generate" widget (the
// frontend gave them a "randomize" one, so every queue re-encoded the video) still hold that widget's value
// after the seed. Widget values load by position, so drop it before the node reads them. Such a workflow may
// also predate widgets added at the end since (Encode's keep), which then take their defaults.
import { app } from "../../scripts/app.js";

const NODES = new Set(["InfinityStarEncode", "InfinityStarInteractStart"]);
const CONTROL_VALUES = new Set(["fixed", "increment", "decrement", "randomize"]);

app.registerExtension({
    name: "InfinityStar.EncodeSeedWithoutControl",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES.has(nodeData.name)) return;
        const configure = nodeType.prototype.configure;
        nodeType.prototype.configure = function (info) {
            const values = info?.widgets_values;
            const seed = (this.widgets ?? []).findIndex((w) => w.name === "seed");
            if (Array.isArray(values) && seed >= 0 && values.length > seed + 1
                && values.length <= this.widgets.length + 1 && CONTROL_VALUES.has(values[seed + 1])) {
                info = { ...info, widgets_values: values.filter((_, i) => i !== seed + 1) };
            }
            return configure.call(this, info);
        };
    },
});
