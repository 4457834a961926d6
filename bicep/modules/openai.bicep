// One new Azure OpenAI account in one region, its model deployments, and the gateway identity's access to it.
// Keys are disabled: the gateway authenticates with its managed identity (Cognitive Services OpenAI User).

type modelDeployment = {
  // The name clients use; also the deployment's name in the account unless deploymentName is given.
  name: string
  deploymentName: string?
  // Model and version, for example gpt-4o and 2024-11-20.
  model: string
  modelVersion: string
  // Provisioned SKUs: PTUs (each model has a minimum and an increment). Standard SKUs: thousands of tokens per minute.
  capacity: int
}

@description('Account name; also its custom subdomain, so the endpoint is https://<name>.openai.azure.com.')
@minLength(2)
@maxLength(64)
param name string

param location string
param tags object

@description('Deployment SKU for every model deployment in this account.')
@allowed([
  'ProvisionedManaged'
  'GlobalProvisionedManaged'
  'DataZoneProvisionedManaged'
  'Standard'
  'GlobalStandard'
  'DataZoneStandard'
])
param sku string

param deployments modelDeployment[]

@description('Principal id of the gateway\'s identity.')
param gatewayPrincipalId string

@description('True to turn public network access off (reached through a private endpoint only).')
param privateNetworking bool = false

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
    name: sku
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

output id string = account.id
output endpoint string = account.properties.endpoint
