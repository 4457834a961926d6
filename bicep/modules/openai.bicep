// One new Azure OpenAI account in one region, its model deployments, the gateway identity's access to it, and its
// diagnostic settings. Keys are disabled: the gateway authenticates with its managed identity (Cognitive Services
// OpenAI User).

@description('A model deployment of a new account. Which model versions each SKU offers in each region, and when they retire, is checked against bicep/azure-openai-models.json by tests/test_bicep.py.')
type modelDeployment = {
  @description('The name clients use; also the deployment\'s name in the account unless deploymentName is given.')
  name: string

  @description('The deployment\'s name in the account, when it differs from name.')
  deploymentName: string?

  @description('Model name, for example gpt-5.4-mini.')
  model: string

  @description('Model version, for example 2026-03-17.')
  modelVersion: string

  @description('Deployment type. Pay-as-you-go: Standard (regional), DataZoneStandard (processed within the data zone), GlobalStandard (processed in any region). Provisioned (PTU, billed hourly): ProvisionedManaged, DataZoneProvisionedManaged, GlobalProvisionedManaged.')
  sku: 'Standard' | 'DataZoneStandard' | 'GlobalStandard' | 'ProvisionedManaged' | 'DataZoneProvisionedManaged' | 'GlobalProvisionedManaged'

  @description('Provisioned SKUs: PTUs (each model has a minimum and an increment). Pay-as-you-go SKUs: thousands of tokens per minute.')
  @minValue(1)
  capacity: int
}

@description('Account name; also its custom subdomain, so the endpoint is https://<name>.openai.azure.com.')
@minLength(2)
@maxLength(64)
param name string

param location string
param tags object

param deployments modelDeployment[]

@description('Principal id of the gateway\'s identity.')
param gatewayPrincipalId string

@description('True to turn public network access off (reached through a private endpoint only).')
param privateNetworking bool = false

@description('Log Analytics workspace that receives the account\'s logs and metrics.')
param logAnalyticsId string

// Built-in role: Cognitive Services OpenAI User (inference calls only; no keys, no deployment management).
var cognitiveServicesOpenAIUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
    networkAcls: {
      defaultAction: privateNetworking ? 'Deny' : 'Allow'
    }
  }
}

// An account accepts one deployment change at a time.
@batchSize(1)
resource modelDeployments 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = [for deployment in deployments: {
  parent: account
  name: deployment.?deploymentName ?? deployment.name
  sku: {
    name: deployment.sku
    capacity: deployment.capacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: deployment.model
      version: deployment.modelVersion
    }
    // Pinned: every region serves the same version until this one retires.
    versionUpgradeOption: 'OnceCurrentVersionExpired'
  }
}]

resource gatewayOpenAIUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, gatewayPrincipalId, cognitiveServicesOpenAIUser)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAIUser)
    principalId: gatewayPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Request and audit logs, and the account's metrics (tokens, latency, PTU utilisation), in the gateway's workspace.
resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-gateway-workspace'
  scope: account
  properties: {
    workspaceId: logAnalyticsId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output id string = account.id
output endpoint string = account.properties.endpoint
